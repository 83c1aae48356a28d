# The two entry points the README starts with. Both install what a fresh Debian machine lacks, then run.
#   make demo   the two-host demo and benchmark (flannel-bench --quick), embedded defaults, no etcd
#   make test   lint (ruff), type-check (mypy) and the whole test suite, as CI runs it
#   make debug  the engine built with AddressSanitizer and UBSan, its C-level unit, property and concurrency tests
#               run on it (make test runs it first)
#   make fuzz   the packet fuzz harness at full size (tests/fuzz/test_fuzz.py)
#   make fuzz-long  the C parsers under libFuzzer for 10^8 inputs each (tests/fuzz/test_parsers.py)

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
APT_PACKAGES := iproute2 iptables nftables iperf3 iputils-ping ethtool etcd-server containernetworking-plugins util-linux \
	openssh-server openssh-client \
	gcc python3-dev python3-venv clang libclang-rt-dev llvm
BENCH_OUT ?= bench-out

.PHONY: setup apt demo test lint micro debug fuzz fuzz-long

# mypy cannot follow the editable install's import hook; it reads the packages through these links instead.
TYPECHECK_TREE := build/typecheck/pyflannel

setup: $(BIN)/flannel-tunnel $(TYPECHECK_TREE)
	@command -v iperf3 >/dev/null && command -v ping >/dev/null && command -v ethtool >/dev/null && \
		command -v ssh >/dev/null && test -x /usr/sbin/sshd && command -v nft >/dev/null && \
		command -v clang >/dev/null && command -v llvm-cov >/dev/null || $(MAKE) apt

apt:
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES)

$(BIN)/flannel-tunnel: pyproject.toml setup.py $(wildcard src_ext/*)
	$(MAKE) apt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test,bench]"
	touch $@

$(TYPECHECK_TREE):
	mkdir -p $@
	for d in dataplane daemon bench; do ln -sfn ../../../$$d $@/$$d; done

demo: setup
	$(BIN)/flannel-bench --quick --json $(BENCH_OUT)/quick.json --plot $(BENCH_OUT)/quick.png

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

# The sanitizer build first (it puts the normal build back), then everything on the normal build.
test: lint debug
	$(BIN)/python -m pytest -q tests

micro: setup
	$(BIN)/python -m pytest bench/micro.py -q -p no:cacheprovider --benchmark-columns=min,median,mean,ops

# Python itself is not built with the sanitizers, so their runtimes are preloaded; leak reports are off (the
# interpreter keeps memory until exit on purpose). Any UBSan report aborts the test run. The normal build is put
# back afterwards, whatever the result.
SANITIZE := -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer
DEBUG_TESTS := tests/test_prefix_table.py tests/test_prefix_table6.py tests/test_peer_slots.py tests/test_offload.py \
	tests/test_offload6.py tests/test_engine_unit.py

debug: setup
	CFLAGS="$(SANITIZE) -O1 -g" LDFLAGS="$(SANITIZE)" $(BIN)/pip install -q --no-deps -e .
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
		ASAN_OPTIONS=detect_leaks=0 $(BIN)/python -m pytest -q -p no:cacheprovider $(DEBUG_TESTS); \
		status=$$?; $(BIN)/pip install -q --no-deps -e . && exit $$status

# The fuzz harness at full size: 10 million packets from the wire and 10 million into flannel0 (a few minutes).
# The test suite runs the same test with 200,000.
fuzz: setup
	PYFLANNEL_FUZZ_PACKETS=10000000 $(BIN)/python -m pytest -q -s -p no:cacheprovider tests/fuzz/test_fuzz.py

# The C parsers under libFuzzer (AddressSanitizer and UBSan) for 10^8 inputs each, from the checked-in corpus;
# prints the lines of each parser reached. The test suite runs the same with 200,000.
fuzz-long: setup
	PYFLANNEL_FUZZ_RUNS=100000000 $(BIN)/python -m pytest -q -s -p no:cacheprovider tests/fuzz/test_parsers.py
