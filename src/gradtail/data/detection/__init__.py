"""Detection data: COCO / LVIS annotation files (:mod:`gradtail.data.detection.lvis`) and the
Fashion-MNIST detection benchmark written in that format (:mod:`gradtail.data.detection.fm_benchmark`)."""
