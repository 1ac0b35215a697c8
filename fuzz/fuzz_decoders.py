"""Coverage-guided fuzzing of the frame and value decoders with atheris.

    pip install atheris
    python fuzz/fuzz_decoders.py --seed-corpus fuzz/corpus   # valid frames to start from
    python fuzz/fuzz_decoders.py fuzz/corpus -max_total_time=300

The input is fed to a FrameDecoder (after a valid preamble) in chunks whose sizes the
fuzzer also chooses; every complete frame's value is decoded.  The only exceptions
allowed are ProtocolError (and its subclasses) from the decoder and ValueError from
the value decoder: anything else -- or a crash, or a hang -- is a bug.
"""

import sys

import atheris

with atheris.instrument_imports():
    from socketengine import ProtocolError, codec, frames


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    if fdp.ConsumeBool():
        # The value decoder alone: meta and data section split where the fuzzer says.
        meta = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 4096))
        section = bytearray(fdp.ConsumeBytes(fdp.remaining_bytes()))
        codec.decoded_size(meta)  # what a host reads before decoding: never raises
        try:
            codec.decode(meta, section or None)
        except ValueError:
            pass
        return
    dec = frames.FrameDecoder(max_message=1 << 20)
    dec.feed(frames.PREAMBLE)
    stream = fdp.ConsumeBytes(fdp.remaining_bytes())
    chunk = 1 + (len(stream) % 7)
    try:
        for i in range(0, len(stream), chunk):
            for frame in dec.feed(stream[i : i + chunk]):
                try:
                    frame.value()
                except ProtocolError:
                    pass
    except ProtocolError:
        pass


def seed_corpus(directory: str) -> None:
    """Write valid inputs (frames and values with arrays, tuples, big ints) to start from."""
    import os

    import numpy as np

    os.makedirs(directory, exist_ok=True)
    values = [
        "hi",
        [1, (2, 3), {"a": b"x"}],
        np.arange(12, dtype="<f4").reshape(3, 4),
        np.asfortranarray(np.ones((2, 3), np.int16)),
        {"t": (np.float32(1.5), 3**80)},
    ]
    for i, value in enumerate(values):
        meta, buffers, _ = codec.encode(value)
        section = b"".join(bytes(memoryview(b)) for b in buffers)
        with open(os.path.join(directory, f"value{i}"), "wb") as f:
            f.write(b"\x01" + bytes([len(meta) % 256, len(meta) // 256]) + meta + section)
        stream = b"".join(bytes(memoryview(p)) for p in frames.encode_value_frame(0x10, "ch", value))
        with open(os.path.join(directory, f"frame{i}"), "wb") as f:
            f.write(b"\x00" + stream)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--seed-corpus":
        seed_corpus(sys.argv[2])
        sys.exit(0)
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
