"""`python -m dem_jax.preprocess`: the preprocessing job's command line."""

from absl import app

from preprocess.__main__ import main

if __name__ == '__main__':
  app.run(main)
