# guestlink build. Every dependency comes through pkg-config.
#   make            build build/guestlinkd and the tools
#   make check      unit tests (Check) + integration tests (pytest), one summary line
#   make check SANITIZE=1   the same under ASan/UBSan (separate build dir)
#   make bench      benchmarks, each figure beside its baseline
#   make fuzz       every fuzz harness (clang/libFuzzer) for FUZZ_SECONDS each
#   make soak       mixed load with faults injected (SOAK_SECONDS, default 600)
#   make run        deps + build + start on ./state with ./mnt and a demo instance
#   make test       deps + build + every test
#   make install    binaries, man pages, systemd unit

PREFIX  ?= /usr/local
DESTDIR ?=
CC      ?= cc
PKGS    := libuv fuse3 jansson sqlite3 libsodium
EXTRA_LIBS := -lhttp_parser -lwslay

ifeq ($(SANITIZE),1)
BUILD   ?= build-san
SANFLAGS := -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
OPT     := -O1 -g
else
BUILD   ?= build
SANFLAGS :=
OPT     := -O2 -g
endif

WARN    := -Wall -Wextra -Werror -Wshadow -Wvla -Wformat=2 \
           -Werror=implicit-function-declaration -Wno-unused-parameter
VERSION := 0.2.0
CFLAGS  += -std=gnu11 $(OPT) $(WARN) -fstack-protector-strong -D_GNU_SOURCE \
           -DGUESTLINK_VERSION='"$(VERSION)"' \
           -DFUSE_USE_VERSION=35 -I. $(SANFLAGS) \
           $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
LDFLAGS += $(SANFLAGS)
LDLIBS  += $(shell pkg-config --libs $(PKGS) 2>/dev/null) $(EXTRA_LIBS) -lpthread

CORE_SRC := $(wildcard core/*.c)
FSD_SRC  := $(wildcard fsd/*.c)
BRIDGE_SRC := $(wildcard bridge/*.c)
BRIDGE_OBJ := $(BRIDGE_SRC:%.c=$(BUILD)/obj/%.o)
# bridge's wire code: what the guest agent and the CLI link (never the model)
WIRE_SRC := bridge/frame.c bridge/fconn.c bridge/auth.c bridge/vsock.c core/buf.c
WIRE_OBJ := $(WIRE_SRC:%.c=$(BUILD)/obj/%.o)
AGENT_SRC := $(wildcard agent/*.c)
AGENT_OBJ := $(AGENT_SRC:%.c=$(BUILD)/obj/%.o)
CTL_SRC  := $(wildcard ctl/*.c)
CTL_OBJ  := $(CTL_SRC:%.c=$(BUILD)/obj/%.o)
WIRE_PKGS := libuv jansson libsodium
WIRE_LIBS := $(shell pkg-config --libs $(WIRE_PKGS) 2>/dev/null) -lpthread
CORE_OBJ := $(CORE_SRC:%.c=$(BUILD)/obj/%.o)
FSD_OBJ  := $(FSD_SRC:%.c=$(BUILD)/obj/%.o)
UNIT_SRC := $(wildcard tests/unit/test_*.c)
UNIT_BIN := $(UNIT_SRC:tests/unit/%.c=$(BUILD)/tests/%)
TOOL_SRC := $(wildcard tools/*.c)
TOOL_BIN := $(TOOL_SRC:tools/%.c=$(BUILD)/tools/%)

all: $(BUILD)/guestlinkd $(BUILD)/guestlink-agent $(BUILD)/guestlinkctl $(TOOL_BIN)

$(BUILD)/obj/%.o: %.c $(wildcard */*.h)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c -o $@ $<

$(BUILD)/libglcore.a: $(CORE_OBJ)
	@mkdir -p $(dir $@)
	ar rcs $@ $^

$(BUILD)/libglbridge.a: $(BRIDGE_OBJ) $(BUILD)/libglcore.a
	@mkdir -p $(dir $@)
	ar rcs $@ $(BRIDGE_OBJ)

$(BUILD)/guestlinkd: $(FSD_OBJ) $(BUILD)/libglbridge.a $(BUILD)/libglcore.a
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)

$(BUILD)/libglwire.a: $(WIRE_OBJ)
	@mkdir -p $(dir $@)
	ar rcs $@ $^

$(BUILD)/guestlink-agent: $(AGENT_OBJ) $(BUILD)/libglwire.a
	$(CC) $(LDFLAGS) -o $@ $^ $(WIRE_LIBS)

$(BUILD)/guestlinkctl: $(CTL_OBJ) $(BUILD)/libglwire.a
	$(CC) $(LDFLAGS) -o $@ $^ $(WIRE_LIBS)

$(BUILD)/tests/%: tests/unit/%.c tests/unit/unit.h tests/unit/fake_store.h tests/unit/model_ops.h $(BUILD)/libglbridge.a $(BUILD)/libglcore.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $< $(BUILD)/libglbridge.a $(BUILD)/libglcore.a $(LDLIBS) $(shell pkg-config --libs check)

$(BUILD)/tools/%: tools/%.c $(BUILD)/libglbridge.a $(BUILD)/libglcore.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $< $(BUILD)/libglbridge.a $(BUILD)/libglcore.a $(LDLIBS)

unit: $(UNIT_BIN)

check: all unit
	BUILD=$(BUILD) tests/run-all.sh

bench: all
	BUILD=$(BUILD) tools/bench.sh
	BUILD=$(BUILD) tools/bench-devlxd.sh
	BUILD=$(BUILD) tools/bench-vm.sh

FUZZ_SECONDS ?= 60
fuzz:
	FUZZ_SECONDS=$(FUZZ_SECONDS) tools/fuzz.sh

SOAK_SECONDS ?= 600
soak: all
	BUILD=$(BUILD) SOAK_SECONDS=$(SOAK_SECONDS) tools/soak.sh

deps:
	tools/install-deps.sh

run: deps all
	tools/run-demo.sh

test: deps
	$(MAKE) check

install: all
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/share/man/man8 \
	           $(DESTDIR)$(PREFIX)/lib/systemd/system
	install -m 0755 $(BUILD)/guestlinkd $(BUILD)/guestlinkctl $(BUILD)/guestlink-agent \
	    $(DESTDIR)$(PREFIX)/bin/
	install -m 0644 man/guestlinkd.8 man/guestlinkctl.8 man/guestlink-agent.8 \
	    $(DESTDIR)$(PREFIX)/share/man/man8/
	sed 's|@PREFIX@|$(PREFIX)|g' contrib/guestlinkd.service > \
	    $(DESTDIR)$(PREFIX)/lib/systemd/system/guestlinkd.service

clean:
	rm -rf build build-san build-fuzz

.PHONY: all unit check bench fuzz soak deps run test install clean
