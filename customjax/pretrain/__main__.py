from customjax.pretrain.run import run

run()
