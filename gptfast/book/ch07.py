"""Chapter 7, fine-tuning to follow instructions (gptfast.instruct), with the chapter's collate drafts
and its evaluation by a local Ollama model.

``query_model`` talks only to a server on this machine (localhost), as the book's Ollama setup does.
"""

import json
import os
import urllib.error
import urllib.parse
import urllib.request

import torch

from ..instruct import InstructionDataset, custom_collate_fn, format_input
from ._files import fetch

__all__ = ["download_and_load_file", "format_input", "InstructionDataset", "custom_collate_draft_1",
           "custom_collate_draft_2", "custom_collate_fn", "check_if_running", "query_model", "generate_model_scores"]

INSTRUCTION_DATA_URL = ("https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/"
                        "instruction-data.json")
OLLAMA_URL = "http://localhost:11434/api/chat"


def download_and_load_file(file_path, url):
    """The JSON list at ``file_path``, fetched from ``url`` (or copied from a local file or folder) first
    when it is missing."""
    if not os.path.exists(file_path):
        fetch(url, file_path)
    with open(file_path, "r", encoding="utf-8") as f:
        return json.load(f)


def _padded_rows(batch, pad_token_id):
    """Each row + one ``pad_token_id``, padded to the longest row + 1: a list of lists."""
    batch_max_length = max(len(item) + 1 for item in batch)
    return [list(item) + [pad_token_id] * (batch_max_length - len(item)) for item in batch]


def custom_collate_draft_1(batch, pad_token_id=50256, device="cpu"):
    """Section 7.3, first draft: pad every row to the batch's longest; inputs only, (B, T)."""
    rows = _padded_rows(batch, pad_token_id)
    return torch.stack([torch.tensor(r[:-1]) for r in rows]).to(device)


def custom_collate_draft_2(batch, pad_token_id=50256, device="cpu"):
    """Section 7.3, second draft: inputs and the targets shifted by one, each (B, T); padding not masked yet."""
    rows = _padded_rows(batch, pad_token_id)
    inputs = torch.stack([torch.tensor(r[:-1]) for r in rows]).to(device)
    targets = torch.stack([torch.tensor(r[1:]) for r in rows]).to(device)
    return inputs, targets


def check_if_running(process_name):
    """True when a process whose name contains ``process_name`` runs on this machine (e.g. "ollama")."""
    import psutil

    return any(process_name in (proc.info["name"] or "") for proc in psutil.process_iter(["name"]))


def _check_local(url):
    host = urllib.parse.urlparse(url).hostname
    if host not in ("localhost", "127.0.0.1", "::1"):
        raise ValueError(f"query_model talks only to a model server on this machine, not {host!r}: "
                         f"pass a http://localhost:PORT/... URL (Ollama's is {OLLAMA_URL})")


def query_model(prompt, model="llama3", url=OLLAMA_URL):
    """Ask a local Ollama ``model`` for a reply to ``prompt`` (seed 123, temperature 0, 2048-token
    context, as the book); returns the reply's text."""
    _check_local(url)
    data = {"model": model, "messages": [{"role": "user", "content": prompt}],
            "options": {"seed": 123, "temperature": 0, "num_ctx": 2048}}  # deterministic replies
    request = urllib.request.Request(url, data=json.dumps(data).encode("utf-8"), method="POST")
    request.add_header("Content-Type", "application/json")
    try:
        response = urllib.request.urlopen(request)
    except (urllib.error.URLError, OSError) as e:
        raise RuntimeError(f"no Ollama server answers at {url} ({getattr(e, 'reason', e)}): start one with "
                           f"`ollama serve` and `ollama pull {model}`, then run again") from None
    reply = []
    with response:
        for line in response:  # one JSON object per line, each with a piece of the message
            if line.strip():
                reply.append(json.loads(line)["message"]["content"])
    return "".join(reply)


def generate_model_scores(json_data, json_key, model="llama3"):
    """Have a local Ollama ``model`` score each entry's ``json_key`` response from 0 to 100 against
    its reference output; replies that are not an integer are printed and skipped. A list of ints."""
    from tqdm import tqdm

    scores = []
    for entry in tqdm(json_data, desc="Scoring entries"):
        prompt = (f"Given the input `{format_input(entry)}` and correct output `{entry['output']}`, "
                  f"score the model response `{entry[json_key]}` on a scale from 0 to 100, where 100 is the "
                  f"best score. Respond with the integer number only.")
        score = query_model(prompt, model)
        try:
            scores.append(int(score))
        except ValueError:
            print(f"Could not convert score: {score}")
    return scores
