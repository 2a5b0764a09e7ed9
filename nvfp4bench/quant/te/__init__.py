"""The Transformer Engine backend (TE is imported only inside the functions that need it).

    runtime.py  availability checks, the TE recipe of a nvfp4bench recipe, preflight, autocast
    linear.py   the swap of a model's Linear layers for te.Linear
"""
