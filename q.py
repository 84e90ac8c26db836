import sys, json
sys.path.insert(0, '/work/shared/tools')
from qmp_backup import QMP
q = QMP('/tmp/incr/qmp.sock')
def show(*a, **k):
    try:
        r = q.cmd(*a, **k)
    except Exception as e:
        r = repr(e)
    print(a[0], k, '->', json.dumps(r)[:600])
show('block-dirty-bitmap-add', node='a', name='p1', granularity=65536, persistent=True)
show('block-dirty-bitmap-add', node='b', name='p1', granularity=65536, persistent=True)
show('block-dirty-bitmap-add', node='c', name='p1', granularity=65536, persistent=True)
show('block-dirty-bitmap-add', node='b', name='n1', granularity=65536)
r = q.cmd('query-named-block-nodes', flat=True)
for n in r:
    print(n['node-name'], n['drv'], json.dumps(n.get('dirty-bitmaps')))
r = q.cmd('query-block')
print(json.dumps(r)[:300])
