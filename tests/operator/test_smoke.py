from helpers import create, example, wait_for


async def test_create_makes_children(apiserver, operator):
    resp = await create(apiserver.url, example())
    assert resp.status_code == 201, resp.text
    await wait_for(lambda: apiserver.get("apps", "statefulsets", "default", "tiny-prefill"), message="prefill sts")
