"""What a backend is: one record that the model, the scripts, the benchmark and the tests ask."""
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Backend:
    """An encoder implementation.

    forward(encoder, imgs, mask, num_visible=None) -> latent: the encoder's forward pass over the
        parameters every backend shares;
    auto_rank: its place in "auto", which takes the available backend of the lowest rank (None:
        used only when named);
    not_compilable: why torch.compile cannot run it (None: it compiles);
    check(device): raises ValueError, one sentence, when it cannot run on `device` ("cpu",
        "cuda"; None: only whether it is installed); None: it runs everywhere.
    """
    name: str
    forward: Callable
    auto_rank: int | None = None
    not_compilable: str | None = None
    check: Callable | None = None

    @property
    def compiles(self):
        return self.not_compilable is None

    def cannot_run(self, device=None):
        """The sentence saying why it cannot run on `device`, or None when it can."""
        try:
            if self.check is not None:
                self.check(device)
        except ValueError as err:
            return str(err)
        return None

    def available(self, device=None):
        return self.cannot_run(device) is None

    def compile_refusal(self, subject, remedy):
        """'<subject> cannot be compiled (<why>); <remedy>'."""
        return f"{subject} cannot be compiled ({self.not_compilable}); {remedy}"
