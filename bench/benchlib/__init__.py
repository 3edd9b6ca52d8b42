"""The pieces the benchmark scripts in bench/ share; each script is a thin driver over them.

Shared by several scripts:

    procs        child processes (spawned, stopped by pid), free ports, waiting for a listener,
                 and the main() wrapper that stops everything on Ctrl-C or SIGTERM
    gatewayproc  `python -m gateway --config CFG serve` on a config written from sections
    sampling     PSS and CPU of process trees, read from /proc (psutil)
    profiling    py-spy on a gateway process and a summary of its stacks
    machine      the machine description the JSON reports carry
    report       number formatting, aligned tables, JSON files

For throughput.py and soak.py (real fax mail over SMTP):

    workload     MIME fax messages with real PDFs, built before the timing starts
    client       the closed-loop aiosmtplib session and its outcomes
    sinks        what the relay forwards to: bench/sink.py or the GreenFax stand-in
    postfixrelay a private Postfix instance as the yardstick relay

For one script each:

    cell, cellreport          throughput.py: one measured cell; its table, headroom and ratios
    soakcopies, soakmemory,   soak.py: distinct copies of a message pool; the memory analysis and
    soakreport                verdict; the printed and JSON report
    statusload                status.py: a store of jobs and the status reports about them

Nothing here runs on import: the scripts build what they use.
"""

from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent.parent
REPO_DIR = BENCH_DIR.parent
