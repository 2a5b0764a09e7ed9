"""The grid: every cell of a study, resumable, parallel, on Slurm (``python -m nvfp4bench.grid``,
``run_all.sh``).

    cli.py      presets, options, the plan of cells, main()
    cells.py    a cell's target (result path, config hash) and whether it is done
    process.py  one cell's process and its log
    workers.py  worker threads, scheduling, signals
    slurm.py    array jobs: one task per cell
"""
