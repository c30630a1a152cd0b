"""Merlin headers and pixel decoding: numba decoders vs independent NumPy encoders, and real files."""

from __future__ import annotations

import numpy as np
import pytest

from stemdask.io.merlin import (
    MerlinError,
    decode_frames,
    mib_frames,
    mpx_prefix,
    parse_acquisition_header,
    parse_frame_header,
    parse_mpx_prefix,
    to_store_orientation,
)
from stemdask.testing.merlin import acquisition_header, encode_frames, encode_pixels, split_quad

CASES = [
    (d, raw, shape)
    for d, raw in [(1, False), (6, False), (12, False), (24, False), (1, True), (6, True), (12, True)]
    for shape in [(256, 256), (512, 512), (8, 64)]
    if not (raw and shape == (8, 64))
]  # RAW: whole chips


@pytest.mark.parametrize("depth,raw,shape", CASES)
def test_decode_equals_the_encoded_frames(depth, raw, shape):
    rng = np.random.default_rng(depth)
    frames = rng.integers(0, 1 << depth, size=(3,) + shape)
    whole = encode_frames(frames, depth, raw)
    header = parse_frame_header(whole[0].tobytes(), "test")
    assert (header.counter_depth, header.raw, header.shape, header.frame_bytes) == (depth, raw, shape, whole.shape[1])
    assert header.layout == ("2x2" if shape == (512, 512) else "1x1")
    assert np.array_equal(decode_frames(whole[:, header.header_bytes :], header), frames)


def test_raw_bit_order_by_hand():
    """RAW 1-bit: the 8 bytes of each 64-bit word reversed, least significant bit first."""
    frame = np.zeros((1, 256, 256), np.uint8)
    frame[0, 0, 0] = frame[0, 0, 9] = frame[0, 1, 64] = 1
    data = encode_pixels(frame, 1, raw=True)
    assert data[0, 7] == 0b1 and data[0, 6] == 0b10  # pixel 0 → byte 7 bit 0; pixel 9 → byte 6 bit 1
    assert data[0, 32 + 15] == 1  # row 1 starts at byte 32; pixel 64 → second word's last byte


def test_quad_raw_chip_layout():
    frames = np.zeros((1, 512, 512), np.uint16)
    frames[0, 0, 0], frames[0, 511, 511] = 1, 2
    chips = split_quad(frames)
    assert chips.shape == (1, 256, 1024)
    assert chips[0, 0, 768] == 1  # chip 3 is the top-left quadrant
    assert chips[0, 0, 0] == 2  # chip 0 is the bottom-right one, rotated 180°


def test_real_processed_files_decode_like_rosettasciio(real_merlin):
    from rsciio.quantumdetector import file_reader

    files = sorted(p for p in real_merlin.glob("*.mib") if "RAW" not in p.name)
    assert len(files) == 16
    for f in files:
        header, whole = mib_frames(f)
        acq = parse_acquisition_header(f.with_suffix(".hdr").read_bytes(), str(f))
        assert acq.frames == whole.shape[0] and acq.counter_depth == header.counter_depth
        assert acq.assembly == header.layout
        ours = to_store_orientation(decode_frames(whole[:, header.header_bytes :], header))
        theirs = np.asarray(file_reader(str(f))[0]["data"]).reshape(ours.shape)
        assert np.array_equal(ours, theirs), f.name


def test_real_raw_files_match_their_processed_twins(real_merlin):
    """rosettasciio cannot read RAW: the RAW and processed acquisitions of one pattern correlate (r > 0.99),
    a vertical flip of either falls well below."""
    for name in ("Single_9_Frame_CounterDepth_1_Rows_256", "Quad_9_Frame_CounterDepth_1_Rows_256"):
        images = []
        for f in (real_merlin / f"{name}RAW.mib", real_merlin / f"{name}.mib"):
            header, whole = mib_frames(f)
            images.append(decode_frames(whole[:, header.header_bytes :], header).sum(axis=0).astype(float))
        raw, processed = images
        assert np.corrcoef(raw.ravel(), processed.ravel())[0, 1] > 0.99
        assert np.corrcoef(raw[::-1].ravel(), processed.ravel())[0, 1] < 0.9
        # re-encoding the decoded RAW frames gives the file's bytes back
        header, whole = mib_frames(real_merlin / f"{name}RAW.mib")
        frames = decode_frames(whole[:, header.header_bytes :], header)
        sent = split_quad(frames) if header.layout == "2x2" else frames
        assert np.array_equal(encode_pixels(sent, 1, raw=True), whole[:, header.header_bytes :])


def test_headers_and_framing_errors_name_the_source():
    assert parse_mpx_prefix(mpx_prefix(2048), "s") == 2048
    with pytest.raises(MerlinError, match="src: expected the Merlin framing"):
        parse_mpx_prefix(b"GARBAGEGARBAGEG", "src")
    with pytest.raises(MerlinError, match="expected the acquisition header"):
        parse_acquisition_header(b"MQ1,000001", "src")
    acq = parse_acquisition_header(acquisition_header(12, 6, quad=True), "src")
    assert (acq.frames, acq.counter_depth, acq.assembly) == (12, 6, "2x2")
    good = encode_frames(np.zeros((1, 256, 256), np.uint8), 6)[0].tobytes()
    with pytest.raises(MerlinError, match="expected a frame header"):
        parse_frame_header(b"XQ1" + good[3:], "src")
    with pytest.raises(MerlinError, match="unknown pixel type"):
        parse_frame_header(good.replace(b",U08,", b",U09,"), "src")
    raw24 = good.replace(b",U08,", b",R64,").replace(b"1000000ns,6,", b"1000000ns,24,")
    with pytest.raises(MerlinError, match="RAW 24-bit"):
        parse_frame_header(raw24, "src")
