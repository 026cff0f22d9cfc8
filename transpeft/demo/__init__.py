"""The demo: a tiny model family built here (v1 pretrained, v2 and v3 continually pretrained), its
synthetic tasks, and the story that runs the whole product on them."""
