"""Data: the two line forms and their renderer (`records`), validation, chat-template labelling,
tokenization with its cache, and collation. It may use the config, the answer contract and the safety
proofs."""
