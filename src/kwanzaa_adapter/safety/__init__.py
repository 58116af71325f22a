"""The proofs, at the bottom with the config and the answer contract: base-weight checksums (`checksums`),
the artifact manifest and `verify` (`artifacts`) and signing (`signing`). Every layer may use them; they
use nothing of the package above them."""
