from mtx.cli import run

run()
