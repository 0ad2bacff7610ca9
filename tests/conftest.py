import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The tensors in these tests are tiny: intra-op threads only add synchronisation, and
    stall badly when the cores are shared with other work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["step", "general"])
def decoding_path(request, monkeypatch):
    """Run ``generate`` on :class:`attention.decoder_step.DecoderStep` (where it applies)
    or on the general path (the decoder's modules on a ``DecoderCache``)."""
    if request.param == "general":
        monkeypatch.setattr("attention.models.step_applies", lambda model, device_type: False)
    return request.param
