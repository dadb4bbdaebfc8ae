"""Darknet's yolov3.cfg, yolov3-tiny.cfg and yolov3-tiny_3l.cfg written out as layer lists, independent of the
code under test: the network-size tests walk them, the weight-file tests write files in their layout."""

# Darknet sections: ("conv", filters, size, stride, batch_normalize) | ("shortcut",) | ("route", layers)
# | ("upsample",) | ("maxpool", size, stride) | ("yolo",). "P" stands for the prediction filters 3 * (5 + C).


def darknet53_sections():
    sections = [("conv", 32, 3, 1, True)]
    for filters, blocks in ((64, 1), (128, 2), (256, 8), (512, 8), (1024, 4)):
        sections.append(("conv", filters, 3, 2, True))
        for _ in range(blocks):
            sections += [("conv", filters // 2, 1, 1, True), ("conv", filters, 3, 1, True), ("shortcut",)]
    return sections


def yolov3_cfg():
    def head(filters):
        return [
            ("conv", filters, 1, 1, True), ("conv", 2 * filters, 3, 1, True),
            ("conv", filters, 1, 1, True), ("conv", 2 * filters, 3, 1, True),
            ("conv", filters, 1, 1, True), ("conv", 2 * filters, 3, 1, True),
            ("conv", "P", 1, 1, False), ("yolo",),
        ]

    return (
        darknet53_sections()
        + head(512)
        + [("route", [-4]), ("conv", 256, 1, 1, True), ("upsample",), ("route", [-1, 61])]
        + head(256)
        + [("route", [-4]), ("conv", 128, 1, 1, True), ("upsample",), ("route", [-1, 36])]
        + head(128)
    )


def yolov3_tiny_cfg():
    sections = []
    for filters in (16, 32, 64, 128, 256):
        sections += [("conv", filters, 3, 1, True), ("maxpool", 2, 2)]
    return sections + [
        ("conv", 512, 3, 1, True), ("maxpool", 2, 1), ("conv", 1024, 3, 1, True),
        ("conv", 256, 1, 1, True), ("conv", 512, 3, 1, True), ("conv", "P", 1, 1, False), ("yolo",),
        ("route", [-4]), ("conv", 128, 1, 1, True), ("upsample",), ("route", [-1, 8]),
        ("conv", 256, 3, 1, True), ("conv", "P", 1, 1, False), ("yolo",),
    ]


def yolov3_tiny_3l_cfg():
    """AlexeyAB's yolov3-tiny_3l.cfg: yolov3-tiny plus a stride-8 [yolo] fed from the stride-16 level's 3x3 conv
    (route -3) and the backbone's stride-8 conv (layer 6)."""
    return yolov3_tiny_cfg() + [
        ("route", [-3]), ("conv", 128, 1, 1, True), ("upsample",), ("route", [-1, 6]),
        ("conv", 128, 3, 1, True), ("conv", "P", 1, 1, False), ("yolo",),
    ]
