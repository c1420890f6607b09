# adntn: `make demo` and `make test` create .venv, install, and run. Python 3.10+ is all they need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   := demo-out
TORCH  := torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test test-explore bench bench-speed bench-quality bench-runtime clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[test,demo,export]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m adntn.demo $(DEMO)
	$(BIN)/adntn inspect $(DEMO)/digits-vgg11.safetensors
	$(BIN)/adntn compress $(DEMO)/digits-vgg11.safetensors --layers fc6,fc7 --arch mera --ratio 100 \
		--data $(DEMO)/digits --epochs 20 --batch-size 64 --out $(DEMO)/digits.adntn --force
	$(BIN)/adntn report $(DEMO)/digits.adntn
	$(BIN)/adntn expand $(DEMO)/digits.adntn -o $(DEMO)/digits-dense.safetensors --force
	$(BIN)/adntn eval $(DEMO)/digits-dense.safetensors --data $(DEMO)/digits

# the numerical tests again under two other MKL code paths: their tolerances must hold for any BLAS
NUMERIC := tests/test_networks.py tests/test_fit.py

test: $(STAMP)
	$(BIN)/python -m pytest
	MKL_CBWR=AVX2 $(BIN)/python -m pytest $(NUMERIC)
	MKL_CBWR=COMPATIBLE $(BIN)/python -m pytest $(NUMERIC)

# the property tests on fresh random examples, ten times (make test draws the same ones every run)
PROPERTY := tests/test_networks.py tests/test_inference.py tests/test_contract.py tests/test_tensorize.py
test-explore: $(STAMP)
	for run in 1 2 3 4 5 6 7 8 9 10; do ADNTN_HYPOTHESIS=explore $(BIN)/python -m pytest -x $(PROPERTY) || exit 1; done

bench: bench-speed bench-quality bench-runtime

bench-speed: $(STAMP)
	$(BIN)/python bench/speed.py --out bench/results/speed.json

bench-quality: $(STAMP)
	$(BIN)/python bench/quality.py --out bench/results/quality.json

bench-runtime: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[bench,export]'
	$(BIN)/python bench/runtime.py --out bench/results/runtime.json

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache
