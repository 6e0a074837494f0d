"""The directory `perfmw run` puts first on PYTHONPATH: its `sitecustomize` starts perfmw."""
