"""Chapter 6, fine-tuning for classification (gptfast.classify), with the book's data preparation.

gptfast reads the last position by default, as the book; ``pool="last_token"`` reads each text's last
real token instead (keyword-only on every function here).
"""

import os
import zipfile
from pathlib import Path

from ..classify import (SpamDataset, calc_accuracy_loader, calc_loss_batch, calc_loss_loader, classify_review,
                        evaluate_model, train_classifier_simple)
from ._files import fetch

__all__ = ["download_and_unzip_spam_data", "create_balanced_dataset", "random_split", "SpamDataset",
           "calc_accuracy_loader", "calc_loss_batch", "calc_loss_loader", "evaluate_model",
           "train_classifier_simple", "plot_values", "classify_review"]

SPAM_URL = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"


def download_and_unzip_spam_data(url, zip_path, extracted_path, data_file_path):
    """The UCI SMS Spam Collection as ``data_file_path`` (a tab-separated file of label and text): kept
    when it exists, else the zip is fetched from ``url`` (or copied from a local zip or a folder holding
    it) and its ``SMSSpamCollection`` extracted and renamed."""
    data_file_path = Path(data_file_path)
    if data_file_path.exists():
        print(f"{data_file_path} already exists. Skipping download and extraction.")
        return
    fetch(url, zip_path)
    with zipfile.ZipFile(zip_path, "r") as archive:
        archive.extractall(extracted_path)
    os.replace(Path(extracted_path) / "SMSSpamCollection", data_file_path)
    print(f"File downloaded and saved as {data_file_path}")


def create_balanced_dataset(df):
    """As many "ham" rows (a seeded random sample) as there are "spam" rows, ham first. A DataFrame."""
    import pandas as pd

    spam = df[df["Label"] == "spam"]
    ham_subset = df[df["Label"] == "ham"].sample(spam.shape[0], random_state=123)
    return pd.concat([ham_subset, spam])


def random_split(df, train_frac, validation_frac):
    """Shuffle ``df`` (seed 123) and cut it into train, validation and test DataFrames."""
    df = df.sample(frac=1, random_state=123).reset_index(drop=True)
    train_end = int(len(df) * train_frac)
    validation_end = train_end + int(len(df) * validation_frac)
    return df[:train_end], df[train_end:validation_end], df[validation_end:]


def plot_values(epochs_seen, examples_seen, train_values, val_values, label="loss"):
    """Training and validation ``label`` against epochs, examples seen on a second axis; saved as
    ``{label}-plot.pdf`` and shown, as the book's. Returns the figure."""
    import matplotlib.pyplot as plt

    fig, ax1 = plt.subplots(figsize=(5, 3))
    ax1.plot(epochs_seen, train_values, label=f"Training {label}")
    ax1.plot(epochs_seen, val_values, linestyle="-.", label=f"Validation {label}")
    ax1.set_xlabel("Epochs")
    ax1.set_ylabel(label.capitalize())
    ax1.legend()
    ax2 = ax1.twiny()  # a second x-axis sharing the y-axis
    ax2.plot(examples_seen, train_values, alpha=0)  # invisible, aligns the ticks
    ax2.set_xlabel("Examples seen")
    fig.tight_layout()
    fig.savefig(f"{label}-plot.pdf")
    plt.show()
    return fig
