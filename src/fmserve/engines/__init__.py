"""Local inference: each local served entity runs in a supervised worker process.

Parent side: :mod:`fmserve.engines.supervisor` (spawn, admission, restart) and
:mod:`fmserve.engines.local` (the backend seam over a worker). Child side:
:mod:`fmserve.engines.worker_main` with one engine module per library
(:mod:`~fmserve.engines.llama_engine`, :mod:`~fmserve.engines.embed_engine`).
The two sides speak length-prefixed JSON frames (:mod:`fmserve.engines.ipc`).
"""
