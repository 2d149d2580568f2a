"""Entry point: ``python cli.py {fit,validate,test,predict} --config configs/X.yaml``.

The same command is installed as ``lightning-gen``. See lightning_gen/cli.py.
"""

from lightning_gen.cli import console_main

if __name__ == "__main__":
    console_main()
