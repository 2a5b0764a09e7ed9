"""Training one cell: ``python -m nvfp4bench`` (``cli``) over ``run.run(config) -> result``.

    cli.py       the command line: options -> RunConfig, the summary it prints
    run.py       run(config): one cell from its data to its result JSON, checkpoints, resume
    setup.py     seeds, device, precision, the model with its recipe and backend, the loaders
    loop.py      optimizer, scheduler, early stopping, one training epoch (the study's loop)
    evaluate.py  validation, test evaluation, the diagnostics' call site
    losses.py    the study's BCE + Tversky loss
"""
