"""Pixel / video-frame <-> latent conversions and their error messages."""
import pytest

from selfforcing_core.units import blocks_for, latent_frame_of, latent_frames_for, latent_size, video_frames_for


def test_latent_size_and_multiples_of_16():
    assert latent_size(832, 480) == (60, 104)
    with pytest.raises(ValueError, match="width 830 .* use 816 or 832"):
        latent_size(830, 480)
    with pytest.raises(ValueError, match="height 0"):
        latent_size(832, 0)


def test_video_and_latent_frame_counts_round_trip():
    assert latent_frames_for(81) == 21 and video_frames_for(21) == 81
    for latent in range(1, 40):
        assert latent_frames_for(video_frames_for(latent)) == latent
    with pytest.raises(ValueError, match="4n \\+ 1.*use 81 or 85"):
        latent_frames_for(83)


def test_each_video_frame_maps_to_the_latent_frame_that_decodes_it():
    # latent 0 decodes to video frame 0; latent k >= 1 decodes to frames 4k-3 .. 4k.
    owners = {}
    for latent in range(0, 6):
        frames = [0] if latent == 0 else range(4 * latent - 3, 4 * latent + 1)
        owners.update({frame: latent for frame in frames})
    assert all(latent_frame_of(frame) == latent for frame, latent in owners.items())


def test_blocks_cover_the_latent_frames():
    assert [blocks_for(f) for f in (1, 3, 4, 21, 22)] == [1, 1, 2, 7, 8]


def test_training_windows_fill_whole_blocks():
    from selfforcing_core.units import whole_block_latent_frames

    assert whole_block_latent_frames(81) == 21 and whole_block_latent_frames(9) == 3
    with pytest.raises(ValueError, match="not whole blocks of 3; use one of 9, 21, 33"):
        whole_block_latent_frames(13)
    with pytest.raises(ValueError, match="4n \\+ 1"):
        whole_block_latent_frames(10)
