# One command from a fresh machine to a green test run: `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export RAY_AUTH_MODE := disabled
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0
export DS_ACCELERATOR := cpu
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions

.PHONY: install test test-fast demo study bench clean

$(STAMP): requirements.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.txt
	# lpips ships only the LPIPS calibration heads; --no-deps keeps it from replacing the CPU torch.
	$(BIN)/pip install -q --no-deps lpips==0.1.4
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# The tiny pipeline end to end on this machine (videos -> clips -> proxy -> labels -> router -> final
# tokenizer -> AR model under runs/tiny/), the stage table, and where to look in MLflow. A rerun does no work.
demo: $(STAMP)
	$(BIN)/evatok run -c configs/tiny.yaml
	$(BIN)/evatok status -c configs/tiny.yaml
	@echo "Open MLflow: $(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/runs/tiny/mlflow.db  (then http://127.0.0.1:5000)"

# The reproduction study (docs/reproduction.md): the pipeline on 1000 synthetic videos, then what the
# four findings need beside it: the proxy evaluated on the router's assignments, and two AR models on
# codes of equal mean length (the router at a budget of 64 tokens a clip; uniform, 16 tokens a block).
# Every command skips what is done, so `make study` resumes where it stopped.
S := $(BIN)/evatok
SC := -c configs/study.yaml
W := runs/study
study: $(STAMP)
	$(S) run $(SC)
	$(BIN)/python bench/label_frontier.py --label $(W)/label --clips $(W)/data | tee $(W)/label_frontier.txt
	$(BIN)/python bench/label_predictability.py --label $(W)/label --clips $(W)/data --router $(W)/router/router.pt | tee $(W)/label_predictability.txt
	$(S) evaluate $(SC) evaluate.tokenizer=$(W)/proxy/proxy.pt evaluate.output=$(W)/eval-proxy evaluate.ar=none
	$(S) tokenize $(SC) tokenize.mode=budget:64 tokenize.output=$(W)/codes-b64
	$(S) tokenize $(SC) tokenize.mode=uniform:16 tokenize.output=$(W)/codes-u16
	$(S) train ar $(SC) name=study-b64 train.data=$(W)/codes-b64 train.output=$(W)/ar-b64/ar.pt
	$(S) train ar $(SC) name=study-u16 train.data=$(W)/codes-u16 train.output=$(W)/ar-u16/ar.pt
	$(S) evaluate $(SC) evaluate.output=$(W)/eval-gen evaluate.ar=$(W)/ar-b64/ar.pt,$(W)/ar-u16/ar.pt
	$(S) compare $(SC) --out $(W)/compare

clean:
	rm -rf $(VENV) .cache .pytest_cache
