#!/usr/bin/env bash
# Flake-rate soak: runs the NAT-lab and gigabyte test groups N times in a row and reports
# each test's failures out of N, with its median and slowest time.
#
#   ci/soak.sh [N]            (default 20; needs what ci/install.sh installs, and root for the lab)
#   SOAK_FILTER='…' ci/soak.sh 5   other tests (a nextest filter expression)
#
# Every run's JUnit report and output stay in target/soak/ for the failures' causes.
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-20}"
filter="${SOAK_FILTER:-test(/^gib_/) | ((package(ice-probe) | (package(thru) & binary(natlab))) & test(/^natlab_/))}"
out=target/soak
rm -rf "$out"
mkdir -p "$out"
echo "soak: building"
cargo nextest run --workspace --locked --profile ci --no-run
start=$(date +%s)
for i in $(seq 1 "$n"); do
    t0=$(date +%s)
    rc=0
    cargo nextest run --workspace --locked --profile ci --no-fail-fast -E "$filter" \
        >"$out/run-$i.log" 2>&1 || rc=$?
    cp target/nextest/ci/junit.xml "$out/junit-$i.xml" 2>/dev/null || true
    echo "soak: run $i/$n exit $rc in $(($(date +%s) - t0)) s ($(grep -E '^ +Summary' "$out/run-$i.log" | tail -1 | sed 's/^ *//'))"
done
echo "soak: $n runs in $(($(date +%s) - start)) s"
python3 - "$out" "$n" <<'PY'
import glob, statistics, sys
import xml.etree.ElementTree as ET
out, n = sys.argv[1], int(sys.argv[2])
tests = {}
for f in sorted(glob.glob(f"{out}/junit-*.xml")):
    run = f.rsplit("-", 1)[1].split(".")[0]
    for suite in ET.parse(f).getroot().iter("testsuite"):
        for c in suite.iter("testcase"):
            key = f"{suite.get('name')} {c.get('name')}"
            failed = c.find("failure") is not None or c.find("error") is not None
            t = tests.setdefault(key, {"runs": 0, "fail": [], "times": []})
            t["runs"] += 1
            t["times"].append(float(c.get("time", "0")))
            if failed:
                t["fail"].append(run)
width = max((len(k) for k in tests), default=10)
print(f"\n{'test':<{width}}  failures  median s    max s  failed runs")
for k in sorted(tests):
    t = tests[k]
    print(f"{k:<{width}}  {len(t['fail']):>3}/{t['runs']:<4} {statistics.median(t['times']):>8.1f} {max(t['times']):>8.1f}  {' '.join(t['fail'])}")
bad = sum(1 for t in tests.values() if t["fail"])
missing = [k for k, t in tests.items() if t["runs"] != n]
print(f"\n{len(tests)} tests, {bad} with failures" + (f"; {len(missing)} ran fewer than {n} times" if missing else ""))
sys.exit(1 if bad or missing else 0)
PY
