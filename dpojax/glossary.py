"""The one glossary of dimension letters, used by every file's shape suffixes (`ids_BxT`, `q_BxTxHxDh`).

A name carries its shape as a suffix of dimensions joined by `x`; each letter means the same thing in every module.
A dimension is one letter (`T`, `Dh`: an uppercase letter and its lowercase tail), a product of letters written
together (`SR` = S * R), or the literal 1 (an axis kept at size one). Inside `shard_map` a lowercase letter is one
device's shard of that dimension (`b` rows of B). A letter not listed here is not used; a new dimension gets a new
letter here first. `tests/test_layering.py` checks every identifier of the package against `LETTERS`.

Data and batches
  N   prompts in a batch (a pair is one prompt with K = 2 responses)
  K   responses per prompt, best first (2 for a pair: chosen, rejected)
  B   sequences fed to the model: N * K rows, laid out prompt by prompt (p0r0, p0r1, ..., p1r0, ...)
  T   token positions of a sequence (a length bucket)
  M   prompts (preference rows) in a whole data set
  A   accumulation steps (micro-batches in one optimizer step)

Packed batches (dpojax.data.packing)
  P   packed rows (this host's share)
  J   token positions of a packed row (its length)
  I   entries of a packed row (tokens the log-prob head scores; as many as J)
  O   owner slots of a prompt: K + 1 (its K responses, then its shared prompt)

Model
  V   vocabulary
  D   model width (hidden size)
  F   MLP hidden width
  L   layers
  H   query heads
  G   key/value heads (GQA groups; H is a multiple of G)
  R   query heads per key/value head (H / G)
  Dh  width of one head (two letters, one meaning)
  Dr  rotary width of one head (Dr <= Dh; partial rotary rotates the first Dr)
  X   experts of an MoE layer
  Y   experts each token is routed to (top-k)
  Lb  labels of a sequence-classification (score) head (1 for a reward model)

Attention and the log-prob head
  S   query positions of one attention block
  E   key positions an attention block reads
  C   chunk length of the log-prob head (positions per chunk)
  U   number of chunks (T / C)
  W   vocabulary tile width of the log-prob head
  Tp  T padded up to a multiple of the splash kernel's block

Generation
  Z   slots of a KV cache (prompt bucket plus new tokens)

Expert parallelism (dpojax.models.expert_parallel)
  Q   devices of the mesh's expert axis (expert parallelism)
  Xl  experts held by one device of the expert axis (X / Q)
  Qr  rows one device sends to each device of the expert axis (its worst case: bt * min(Y, Xl))
"""

LETTERS: dict[str, str] = {
    "N": "prompts in a batch",
    "K": "responses per prompt (2 for a pair)",
    "B": "sequences fed to the model (N * K)",
    "T": "token positions",
    "M": "prompts in a data set",
    "A": "accumulation steps",
    "P": "packed rows",
    "J": "token positions of a packed row",
    "I": "entries of a packed row",
    "O": "owner slots of a prompt (K + 1)",
    "V": "vocabulary",
    "D": "model width",
    "F": "MLP hidden width",
    "L": "layers",
    "H": "query heads",
    "G": "key/value heads",
    "R": "query heads per key/value head",
    "Dh": "head width",
    "Dr": "rotary width",
    "X": "experts of an MoE layer",
    "Y": "experts each token is routed to (top-k)",
    "Lb": "labels of a score head",
    "S": "query positions of an attention block",
    "E": "key positions of an attention block",
    "C": "log-prob chunk length",
    "U": "log-prob chunks",
    "W": "vocabulary tile width",
    "Tp": "T padded to the splash block",
    "Z": "KV cache slots",
    "Q": "devices of the expert axis",
    "Xl": "experts on one device of the expert axis",
    "Qr": "rows sent to each device of the expert axis",
}
