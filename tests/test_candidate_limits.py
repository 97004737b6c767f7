"""The inversion worker's rate limits on candidates: per camera id and over all of them."""
from test_liveness import Clock
from workers.inversion_worker import MAX_CAMERAS, CameraRateLimit


def test_a_camera_gets_its_burst_then_its_rate_and_others_are_unaffected():
    clock = Clock()
    limit = CameraRateLimit(rate=0.5, burst=3, total_rate=100, total_burst=100, clock=clock)
    assert [limit.take("a") for _ in range(5)] == [True, True, True, False, False]
    assert limit.take("b")  # another camera has its own bucket
    clock.now += 1.9  # 0.95 of a token
    assert not limit.take("a")
    clock.now += 0.2  # now 1.05: one more
    assert limit.take("a") and not limit.take("a")
    clock.now += 3600  # a quiet hour refills to the burst, no further
    assert [limit.take("a") for _ in range(4)] == [True, True, True, False]


def test_many_camera_ids_share_the_total_budget():
    clock = Clock()
    limit = CameraRateLimit(rate=1, burst=5, total_rate=2, total_burst=10, clock=clock)
    assert sum(limit.take(f"forged-{i}") for i in range(1000)) == 10
    clock.now += 1
    assert sum(limit.take(f"forged-b{i}") for i in range(1000)) == 2


def test_the_buckets_kept_are_bounded():
    limit = CameraRateLimit(rate=1, burst=1, total_rate=1e9, total_burst=10**9, clock=Clock())
    for i in range(MAX_CAMERAS + 50):
        limit.take(f"cam-{i}")
    assert len(limit.cameras) == MAX_CAMERAS and "cam-0" not in limit.cameras and f"cam-{MAX_CAMERAS + 49}" in limit.cameras
