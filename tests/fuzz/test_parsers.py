"""Coverage-guided fuzzing (libFuzzer, Debian's clang) of the engine's C parsers, on a build with AddressSanitizer
and UBSan: the virtio header and GSO split, TCP/UDP coalescing, the IPv6 extension-header walk and ICMPv6 errors,
and the control messages of a receive. Each harness (tests/fuzz/parsers/fuzz_*.c) starts from the checked-in
corpus and runs PYFLANNEL_FUZZ_RUNS inputs (`make fuzz-long`: 10^8); any sanitizer report, assertion or hang
fails it. Then the corpus it ended with is replayed through a coverage build, and the lines of each parser's
functions reached are printed (tests/fuzz/README.md keeps the figures) and held to a floor, so a harness that
stops reaching its parser fails too."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).with_name("parsers")
SRC = Path(__file__).parents[2] / "src_ext"
RUNS = int(os.environ.get("PYFLANNEL_FUZZ_RUNS", "200000"))
SANITIZE = ["-fsanitize=fuzzer,address,undefined", "-fno-sanitize-recover=undefined", "-g", "-O1"]
COVERAGE = ["-fsanitize=fuzzer", "-fprofile-instr-generate", "-fcoverage-mapping", "-O0"]
# The parser each harness drives: its header and functions, and the share of their lines a run must reach.
PARSERS: dict[str, tuple[str, tuple[str, ...], float]] = {
    "vnet_gso": ("offload.h", ("vnet_finish_csum", "gso_split", "l4_set_check"), 0.95),
    "coalesce": ("offload.h", ("gro_add", "gro_candidate", "gro_candidate_udp", "gro_can_append", "gro_append",
                               "gro_new_item", "gro_finish", "gro_unmerge", "gro_plain_ip"), 0.95),
    "ipv6": ("ipv6.h", ("ip6_link_scope", "ip6_upper", "ip6_error_allowed", "ip6_build_error"), 0.95),
    "cmsg": ("cmsg.h", ("cmsg_parse_rx", "cmsg_has"), 0.95),
}


def _build(harness: str, flags: list[str], out: Path) -> Path:
    subprocess.run(["clang", *flags, "-Wall", "-Wno-unused-function", f"-I{SRC}", "-o", str(out),
                    str(HERE / f"fuzz_{harness}.c")], check=True)
    return out


def _coverage(harness: str, corpus: Path, work: Path) -> dict[str, tuple[int, int]]:
    """{function: (lines, lines reached)} of the harness's parser, replaying the corpus through a coverage build."""
    header, functions, _ = PARSERS[harness]
    binary = _build(harness, COVERAGE, work / f"cov_{harness}")
    subprocess.run([str(binary), "-runs=0", str(corpus)], check=True, capture_output=True,
                   env={**os.environ, "LLVM_PROFILE_FILE": str(work / "run.profraw")})
    subprocess.run(["llvm-profdata", "merge", "-o", str(work / "run.profdata"), str(work / "run.profraw")],
                   check=True)
    report = subprocess.run(["llvm-cov", "report", str(binary), f"-instr-profile={work / 'run.profdata'}",
                             "-show-functions", str(SRC / header)], check=True, capture_output=True, text=True)
    found = {}
    for line in report.stdout.splitlines():
        fields = line.split()
        name = fields[0].rpartition(":")[2] if fields else ""
        if name in functions:  # name, regions, missed, cover, lines, missed, cover, ...
            found[name] = (int(fields[4]), int(fields[4]) - int(fields[5]))
    assert set(found) == set(functions), report.stdout
    return found


@pytest.mark.timeout(3600)
@pytest.mark.parametrize("harness", sorted(PARSERS))
def test_a_parser_under_fuzzing(harness: str, tmp_path: Path) -> None:
    binary = _build(harness, SANITIZE, tmp_path / f"fuzz_{harness}")
    corpus = tmp_path / "corpus"
    shutil.copytree(HERE / "corpus" / harness, corpus)
    run = subprocess.run([str(binary), f"-runs={RUNS}", "-timeout=5", "-rss_limit_mb=2048", str(corpus)],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0 and f"Done {RUNS} runs" in run.stderr, run.stderr[-4000:]
    covered = _coverage(harness, corpus, tmp_path)
    lines, reached = map(sum, zip(*covered.values(), strict=True))
    edges = re.findall(r"cov: (\d+)", run.stderr)[-1]
    print(f"\n{harness}: {RUNS} inputs, {len(list(corpus.iterdir()))} in the corpus, {edges} edges; lines reached:",
          ", ".join(f"{name} {got}/{total}" for name, (total, got) in covered.items()), f"= {reached}/{lines}")
    assert reached >= PARSERS[harness][2] * lines, covered
