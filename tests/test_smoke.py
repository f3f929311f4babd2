IRIS_VECTOR = [1.0380048, 0.5586108, 1.1037828, 1.712096]


def test_iris_vector_is_class_2(iris_server):
    response = iris_server.post({"source": 1, "data": {"dtype": "double", "values": [IRIS_VECTOR]}})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["dtype"] == "float" and body["shape"] == [1, 3]
    probabilities = body["values"][0]
    assert max(range(3), key=probabilities.__getitem__) == 2
