"""Generation shared by evaluation, the preference stage and the backend: batched greedy decoding
(`decoding`) and the answer contract as a grammar (`grammar`). It may use the base model and every
layer below it; a faster engine belongs here too."""
