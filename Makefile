# luaguard: the two commands are `make run` and `make test`.
BUILD      ?= build
ASAN_BUILD ?= build-asan
LUAJIT     ?= checkhook
JOBS       ?= 2
PYTEST     := /usr/bin/python3 -m pytest
MODULE     := $(BUILD)/ngx_http_luaguard_module.so
ASAN_MODULE := $(ASAN_BUILD)/ngx_http_luaguard_module.so
PORT       ?= 8080
VERSION    ?= 0.1.0

.PHONY: all deps deps-test build build-asan run test test-unit test-e2e \
        test-asan-fast test-asan test-soak soak lint install deb bench clean audit \
        ecosystem

all: build

deps:
	@scripts/install-deps.sh build

deps-test:
	@scripts/install-deps.sh test

build: deps
	@cmake -S . -B $(BUILD) -DLUAGUARD_LUAJIT=$(LUAJIT) >/dev/null
	@cmake --build $(BUILD) -j$(JOBS) -- --no-print-directory

build-asan: deps
	@cmake -S . -B $(ASAN_BUILD) -DLUAGUARD_LUAJIT=$(LUAJIT) \
	    -DLUAGUARD_SANITIZE=ON -DLUAGUARD_FAULT_INJECTION=ON \
	    -DLUAGUARD_CACHE_DIR=$(CURDIR)/$(BUILD) >/dev/null
	@cmake --build $(ASAN_BUILD) -j$(JOBS) --target ngx_http_luaguard_module \
	    -- --no-print-directory

run: build
	@scripts/run-example.sh $(MODULE) $(PORT)

test: deps-test build
	@$(MAKE) --no-print-directory lint test-unit test-e2e test-asan-fast test-soak

# The Lua compiled into the module (lua/*.lua), checked as Lua.
lint: deps-test
	@luacheck -q lua/

test-unit:
	@cd $(BUILD) && ctest --output-on-failure

test-e2e:
	@LUAGUARD_MODULE=$(CURDIR)/$(MODULE) $(PYTEST) -q -p no:cacheprovider tests/e2e

# A fast subset of the end-to-end suite under ASan+UBSan; the whole suite
# with `make test-asan`.
test-asan-fast: build-asan
	@LUAGUARD_MODULE=$(CURDIR)/$(ASAN_MODULE) LUAGUARD_ASAN=1 \
	    $(PYTEST) -q -p no:cacheprovider -m asan_fast tests/e2e

test-asan: deps-test build-asan
	@LUAGUARD_MODULE=$(CURDIR)/$(ASAN_MODULE) LUAGUARD_ASAN=1 \
	    $(PYTEST) -q -p no:cacheprovider tests/e2e

# Mixed normal and hostile traffic on 4 workers with a reload every 30 s
# (bench/soak.py); `make soak` runs it for SOAK_SECONDS (30 minutes by
# default), `make test` for one minute.
SOAK_SECONDS ?= 1800
soak: deps-test build
	@/usr/bin/python3 bench/soak.py --module $(CURDIR)/$(MODULE) \
	    --seconds $(SOAK_SECONDS) --json $(BUILD)/soak.json

test-soak:
	@/usr/bin/python3 bench/soak.py --module $(CURDIR)/$(MODULE) --seconds 60

# luaguard-audit (docs/audit.md) on the example app, with the placeholders
# scripts/run-example.sh fills in; fails on a high-severity finding.
audit: deps
	@cmake -S . -B $(BUILD) -DLUAGUARD_LUAJIT=$(LUAJIT) >/dev/null
	@cmake --build $(BUILD) -j$(JOBS) --target luaguard-audit \
	    -- --no-print-directory
	@$(BUILD)/luaguard-audit -D LUAGUARD_MODULE=$(CURDIR)/$(MODULE) \
	    -D PREFIX=$(CURDIR)/$(BUILD)/example -D EXAMPLES=$(CURDIR)/examples \
	    -D PORT=$(PORT) examples/nginx.conf

# Real OpenResty libraries (the ECOSYSTEM folder) used as their READMEs
# show, on luaguard and on lua-nginx-module side by side; writes the matrix
# to docs/ecosystem.md. Slow, so not part of `make test`. Fails only when a
# library passes on lua-nginx-module and fails on luaguard without a
# recorded reason (tests/ecosystem/known_gaps.py).
ECOSYSTEM ?= ../shared/ecosystem
ecosystem: deps-test build
	@rm -f $(BUILD)/ecosystem.json
	@ECOSYSTEM=$(abspath $(ECOSYSTEM)) \
	    ECOSYSTEM_RESULTS=$(CURDIR)/$(BUILD)/ecosystem.json \
	    LUAGUARD_MODULE=$(CURDIR)/$(MODULE) \
	    $(PYTEST) -q -p no:cacheprovider --tb=line tests/ecosystem; \
	    rc=$$?; [ $$rc -le 1 ] || exit $$rc
	@/usr/bin/python3 scripts/ecosystem-matrix.py \
	    --ecosystem $(abspath $(ECOSYSTEM)) \
	    --results $(BUILD)/ecosystem.json --out docs/ecosystem.md

install: build
	install -D -m 0644 $(MODULE) /usr/lib/nginx/modules/ngx_http_luaguard_module.so
	install -D -m 0644 packaging/mod-http-luaguard.conf \
	    /usr/share/nginx/modules-available/mod-http-luaguard.conf
	@echo "enable with: ln -s /usr/share/nginx/modules-available/mod-http-luaguard.conf /etc/nginx/modules-enabled/40-mod-http-luaguard.conf"

# libnginx-mod-http-luaguard_$(VERSION)_amd64.deb, laid out as Debian's
# libnginx-mod-* packages and checked with lintian (packaging/build-deb.sh).
deb: build
	@scripts/install-deps.sh deb
	@packaging/build-deb.sh $(MODULE) $(VERSION) $(BUILD)

bench: build
	@scripts/install-deps.sh bench
	@/usr/bin/python3 bench/run.py --module $(CURDIR)/$(MODULE)

clean:
	rm -rf $(BUILD) $(ASAN_BUILD)
