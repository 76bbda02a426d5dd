"""machaon: receives DICOM studies, runs AI models on them, sends results to the PACS.

The modules, in the order a study passes through them:

    scp          the DICOM listener: C-ECHO and C-STORE, each instance kept before it is acknowledged
    spool        where received instances and results live on disk, written durably
    store        the job store: tables, statuses and their transitions, ingest and queries
    completion   when a study is complete
    rules        which models a series gets, and where their results go
    planner      creating the jobs of a completed study
    worker       claiming a job under a lease and running it
    preprocess   DICOM pixels to model input, and model output back to the source grid
    inference    ONNX Runtime sessions, warm, one per model and precision
    results      what each task produces: SEG and SR objects (highdicom)
    senders/     one module per destination type (folder, DICOM C-STORE, DICOMweb STOW-RS)
    dispatch     sending results to their destinations, with retries and backoff

Around them: config (settings), manifest (model packages), startup (checks before serving),
scheduler and serve (running it all), cli (the `machaon` command), and tools/ (building
models, the phantom generator and the demo; not used by `machaon serve`).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("machaon")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0+unknown"
