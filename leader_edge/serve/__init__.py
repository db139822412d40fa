"""`leader-edge serve`: a bundle behind HTTP, torch-free (the base package + the [serve] extra).

    schema.py   the JSON request (pydantic): canonical visit fields, one patient or a batch
    fhir.py     a FHIR R4 Bundle -> request patients, and what it could not use
    model.py    the one door into the core: load, check (the visits reader's contract), score, format
    metrics.py  Prometheus text
    app.py      the Starlette app: routes, token, limits, micro-batching, bundle swap
"""
