from conftest import CHAT, Server


def test_health_and_chat(server: Server) -> None:
    assert server.health()["status"] == "ok"
    with server.client() as c:
        r = c.post(f"/serving-endpoints/{CHAT}/invocations",
                   json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                         "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 4
