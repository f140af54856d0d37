"""``make bench``: perf_analyzer against the served repository, baselines without a server, a report.

One job per module: :mod:`.inputs` (requests and perf_analyzer ``--input-data``),
:mod:`.perf_analyzer` (finding and running the binary), :mod:`.results` (CSV and profile parsing),
:mod:`.baselines` (in-process and Hugging Face eager), :mod:`.report` and :mod:`.plots` (output),
:mod:`.run` (the whole run).
"""
