"""Our toy LM as a transformers citizen: weights and configs mapped one to one onto the Llama family
(convert.py) and our tokenizers as transformers fast tokenizers (tokenizer.py). The commands are
train/export.py (a run -> a folder AutoModelForCausalLM loads) and `init_from` in train/lm.py (a folder -> a run)."""
