"""Run every benchmark in one go (about 35 minutes on the project's 2-core machine; issue 15's scale run
is 10 of them) and print the tables.

    make bench      (or: python -m bench.run_all)
"""
import subprocess
import sys
import time

BENCHMARKS = [("bench.ack_latency", ["--events", "1000"]), ("bench.ack_large", ["--rounds", "100"]),
              ("bench.cold_start", ["--runs", "5"]), ("bench.translation", []),
              ("bench.upload_economy", []), ("bench.e2e_latency", []), ("bench.fault_burst", []),
              ("bench.backfill", []),
              ("bench.fanout", ["--integrations", "1000", "--store-ms", "5", "--metrika-ms", "100"]),
              ("bench.writes", []), ("bench.upload_history", []), ("bench.products_reconcile", []),
              ("bench.scale", [])]
# Lines that are not the tables: moto's banner, and the worker's CloudWatch metric lines (EMF JSON).
NOISE = ("Found ", '{"_aws"')

if __name__ == "__main__":
    started = time.monotonic()
    for module, args in BENCHMARKS:
        result = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True)
        print("\n".join(line for line in result.stdout.splitlines() if not line.startswith(NOISE)), flush=True)
        if result.returncode:
            print(result.stderr[-3000:], file=sys.stderr)
            sys.exit(result.returncode)
    print(f"\nall benchmarks: {time.monotonic() - started:.0f} s")
