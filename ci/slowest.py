#!/usr/bin/env python3
"""Prints the slowest test cases of a nextest JUnit report: slowest.py REPORT [N]."""
import sys
import xml.etree.ElementTree as ET

path = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 15
try:
    root = ET.parse(path).getroot()
except (OSError, ET.ParseError) as e:
    print(f"slowest: cannot read {path}: {e}")
    sys.exit(1)
cases = []
for suite in root.iter("testsuite"):
    for case in suite.iter("testcase"):
        failed = case.find("failure") is not None or case.find("error") is not None
        cases.append((float(case.get("time", "0")), suite.get("name", "?"), case.get("name", "?"), failed))
cases.sort(reverse=True)
total = sum(c[0] for c in cases)
print(f"\n==> slowest {min(n, len(cases))} of {len(cases)} tests ({total:.0f} test-seconds in all)")
for t, suite, name, failed in cases[:n]:
    print(f"{t:8.1f}s  {suite} {name}{'  FAILED' if failed else ''}")
