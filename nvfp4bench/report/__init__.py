"""The report of a results folder: tables, paired statistics, figures
(``python -m nvfp4bench.report``).

    cli.py      the command line
    build.py    build_report(results_dir): renders report.md and the CSVs
    cells.py    reading the cell results, one view per dataset and split protocol
    tables.py   summary, comparison, ranking, consistency
    stats.py    paired tests, intervals, Holm, Kendall's W
    figures.py  the figures (matplotlib; without it the report says so)
"""
