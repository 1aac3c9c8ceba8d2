"""The book's modules under the book's names: ``gptfast.book.ch02`` ... ``ch07``, ``appendix_a``,
``appendix_d``, ``appendix_e`` and ``kv_cache``, each exporting what the matching module of the book's
``llms_from_scratch`` package exports, with the same signatures and defaults.

Coming from the book, change one line::

    from llms_from_scratch.ch04 import GPTModel      # the book
    from gptfast.book.ch04 import GPTModel           # gptfast: same names, same numbers

Each name is gptfast's implementation where gptfast has one, so the model runs on gptfast's kernels
when they are chosen. Nothing here downloads anything unless a download function is called, and
every one of them also takes a local file or folder. See docs/book.md for the differences.
"""
