from customjax.shapeworld.pretrain.run import run

run()
