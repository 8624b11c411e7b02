"""`python -m core.demo --out DIR --n N --seed S`: write the demo dataset (see core/demo/dataset.py)."""

from core.demo.dataset import main

main()
