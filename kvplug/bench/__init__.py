"""The serving bench suite (``kvplug bench run`` / ``kvplug bench report``).

workloads.py   seeded chat / document-QA / no-reuse request streams
configs.py     the configurations compared (vLLM alone, kvplug, LMCache)
server.py      one ``kvplug serve`` process (or LMCache's server) and its RSS
client.py      the OpenAI streaming client that drives it at a concurrency
metrics.py     Prometheus text from /metrics, and kvplug's counters in it
environment.py machine, versions, load average
runner.py      one results file per (configuration, workload, concurrency)
report.py      plots and the README table from the results files
"""
