"""Bridges to the libraries users bring: PEFT's adapters (:mod:`.peft`) and the Hugging Face
``Trainer`` (:mod:`.transformers`). Each imports its library only when used."""
