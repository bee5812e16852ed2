"""Fine-tuning: data validation, "auto" hyperparameters, tokenized examples, the LoRA trainer,
and the job runner the worker calls."""
