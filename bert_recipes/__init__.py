"""bert-recipes: recipe-driven BERT pretraining (MLM + NSP) and GLUE fine-tuning."""

__version__ = "0.1.0"
