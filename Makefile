# `make demo` and `make test` each set up .venv on first use, then run.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: demo test venv clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m mg5jax.demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadgroup tests

clean:
	rm -rf .venv .cache outputs
