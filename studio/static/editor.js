// The studio's box editor: runs as the js_on_load of a gr.HTML whose value is the editor state
// (studio/editor.py documents it). Gradio provides `element`, `props`, `trigger` and `watch`.
// Every finished edit writes the new state to props.value and fires the custom 'edit' event.
// No external assets: plain DOM and SVG.
(function () {
  const GRID = 512;            // the LLM's canvas: moved coordinates snap to multiples of 1/512
  const MIN_SIZE = 8 / GRID;   // a resized box keeps at least 8 canvas pixels per side
  const LABEL_FONT = 0.065;      // label font size, a fraction of the canvas's short side
  const LABEL_CHAR_WIDTH = 0.62; // average sans-serif character width, in em (labels are shortened to fit)
  const SVG_NS = 'http://www.w3.org/2000/svg';
  const root = element.querySelector('.lvd-editor');
  let state = null;

  const clone = (value) => JSON.parse(JSON.stringify(value));
  const snap = (value) => Math.round(value * GRID) / GRID;
  const clamp = (value, lo, hi) => Math.min(hi, Math.max(lo, value));
  const colour = (index) => {
    const palette = (state && state.palette) || [];
    return palette.length ? palette[index % palette.length] : '#888888';
  };

  function commit() {
    props.value = clone(state);
    trigger('edit');
  }

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
    return node;
  }

  function nearestBox(boxes, frame) {
    for (let distance = 1; distance < boxes.length; distance++) {
      for (const k of [frame - distance, frame + distance]) {
        if (k >= 0 && k < boxes.length && boxes[k]) return boxes[k].slice();
      }
    }
    return [192 / GRID, 192 / GRID, 320 / GRID, 320 / GRID];
  }

  function renderObjects(container) {
    const table = el('div', {class: 'lvd-objects'});
    state.objects.forEach((obj, index) => {
      const row = el('div', {class: 'lvd-object', 'data-id': String(obj.id)});
      const swatch = el('span', {class: 'lvd-swatch', title: 'colour of object ' + obj.id});
      swatch.style.background = colour(index);
      row.appendChild(swatch);
      const phrase = el('input', {class: 'lvd-phrase', type: 'text', 'aria-label': 'phrase of object ' + obj.id});
      phrase.value = obj.phrase;
      phrase.addEventListener('change', () => { obj.phrase = phrase.value; commit(); render(); });
      row.appendChild(phrase);
      const presence = el('span', {class: 'lvd-presence', title: 'keyframes the object is in'});
      obj.boxes.forEach((box, frame) => {
        const label = el('label', {class: 'lvd-present'});
        const tick = el('input', {type: 'checkbox', 'data-frame': String(frame)});
        tick.checked = Boolean(box);
        tick.addEventListener('change', () => {
          obj.boxes[frame] = tick.checked ? nearestBox(obj.boxes, frame) : null;
          commit(); render();
        });
        label.appendChild(tick);
        label.appendChild(document.createTextNode(String(frame + 1)));
        presence.appendChild(label);
      });
      row.appendChild(presence);
      const remove = el('button', {class: 'lvd-remove', type: 'button', title: 'remove object ' + obj.id}, 'Remove');
      remove.addEventListener('click', () => { state.objects.splice(index, 1); commit(); render(); });
      row.appendChild(remove);
      table.appendChild(row);
    });
    const adder = el('div', {class: 'lvd-adder'});
    const name = el('input', {class: 'lvd-new-phrase', type: 'text', placeholder: 'new object phrase, e.g. a red ball'});
    const add = el('button', {class: 'lvd-add', type: 'button'}, 'Add object');
    add.addEventListener('click', () => {
      const phrase = name.value.trim();
      if (!phrase) { name.focus(); return; }
      const nextId = state.objects.reduce((m, o) => Math.max(m, o.id), -1) + 1;
      const boxes = [];
      for (let k = 0; k < state.num_keyframes; k++) boxes.push([192 / GRID, 192 / GRID, 320 / GRID, 320 / GRID]);
      state.objects.push({id: nextId, phrase: phrase, boxes: boxes});
      commit(); render();
    });
    adder.appendChild(name);
    adder.appendChild(add);
    table.appendChild(adder);
    container.appendChild(table);
  }

  function drawBox(group, box, width, height) {
    const [x0, y0, x1, y1] = box;
    const rect = group.querySelector('.lvd-rect');
    rect.setAttribute('x', x0 * width); rect.setAttribute('y', y0 * height);
    rect.setAttribute('width', Math.max(0, (x1 - x0) * width)); rect.setAttribute('height', Math.max(0, (y1 - y0) * height));
    const handle = group.querySelector('.lvd-handle');
    const side = Math.min(width, height) * 0.06;
    handle.setAttribute('x', x1 * width - side); handle.setAttribute('y', y1 * height - side);
    handle.setAttribute('width', side); handle.setAttribute('height', side);
    // The label stays inside the part of the box that is on the canvas, shortened with an ellipsis to fit.
    const label = group.querySelector('.lvd-label');
    const left = Math.max(0, x0) * width, right = Math.min(1, x1) * width;
    label.setAttribute('x', left + 3);
    label.setAttribute('y', Math.max(0, y0) * height + Math.min(width, height) * 0.07);
    label.textContent = fitLabel(label.getAttribute('data-phrase') || '', right - left - 6,
                                 Math.min(width, height) * LABEL_FONT);
  }

  function fitLabel(phrase, room, fontSize) {
    const fits = Math.floor(room / (fontSize * LABEL_CHAR_WIDTH));  // sans-serif: about 0.6 em a character
    if (phrase.length <= fits) return phrase;
    return fits >= 2 ? phrase.slice(0, fits - 1) + '\u2026' : '';
  }

  function startDrag(event, canvas, obj, frame, group, mode) {
    event.preventDefault();
    event.stopPropagation();
    const bounds = canvas.getBoundingClientRect();
    const start = obj.boxes[frame].slice();
    const x0 = event.clientX, y0 = event.clientY;
    const width = state.width, height = state.height;
    let current = start;
    canvas.setPointerCapture(event.pointerId);
    group.classList.add('lvd-dragging');
    const move = (e) => {
      const dx = (e.clientX - x0) / bounds.width, dy = (e.clientY - y0) / bounds.height;
      if (mode === 'move') {
        // Keep the box on the canvas (a box that starts outside may not go further out).
        const sx = snap(clamp(dx, Math.min(0, -start[0]), Math.max(0, 1 - start[2])));
        const sy = snap(clamp(dy, Math.min(0, -start[1]), Math.max(0, 1 - start[3])));
        current = [start[0] + sx, start[1] + sy, start[2] + sx, start[3] + sy];
      } else {
        const x1 = snap(clamp(start[2] + dx, start[0] + MIN_SIZE, Math.max(1, start[2])));
        const y1 = snap(clamp(start[3] + dy, start[1] + MIN_SIZE, Math.max(1, start[3])));
        current = [start[0], start[1], x1, y1];
      }
      drawBox(group, current, width, height);
    };
    const end = (e) => {
      canvas.removeEventListener('pointermove', move);
      canvas.removeEventListener('pointerup', end);
      canvas.removeEventListener('pointercancel', end);
      group.classList.remove('lvd-dragging');
      if (current.some((v, i) => v !== start[i])) {
        obj.boxes[frame] = current;
        commit();
      }
      render();
    };
    canvas.addEventListener('pointermove', move);
    canvas.addEventListener('pointerup', end);
    canvas.addEventListener('pointercancel', end);
  }

  function renderKeyframes(container) {
    const grid = el('div', {class: 'lvd-keyframes'});
    const width = state.width || 512, height = state.height || 512;
    for (let frame = 0; frame < state.num_keyframes; frame++) {
      const panel = el('div', {class: 'lvd-keyframe', 'data-frame': String(frame)});
      panel.appendChild(el('div', {class: 'lvd-keyframe-title'}, 'Keyframe ' + (frame + 1)));
      const canvas = svg('svg', {class: 'lvd-canvas', viewBox: `0 0 ${width} ${height}`, 'data-frame': String(frame)});
      canvas.appendChild(svg('rect', {class: 'lvd-background', x: 0, y: 0, width: width, height: height}));
      state.objects.forEach((obj, index) => {
        const box = obj.boxes[frame];
        if (!box) return;
        const group = svg('g', {class: 'lvd-box', 'data-id': String(obj.id), 'data-frame': String(frame)});
        const stroke = colour(index);
        group.appendChild(svg('rect', {class: 'lvd-rect', stroke: stroke, fill: stroke, 'stroke-width': Math.min(width, height) * 0.012}));
        const label = svg('text', {class: 'lvd-label', 'font-size': Math.min(width, height) * LABEL_FONT,
                                   'data-phrase': obj.phrase});
        group.appendChild(label);
        group.appendChild(svg('rect', {class: 'lvd-handle', stroke: stroke}));
        drawBox(group, box, width, height);
        group.querySelector('.lvd-rect').addEventListener('pointerdown', (e) => startDrag(e, canvas, obj, frame, group, 'move'));
        label.addEventListener('pointerdown', (e) => startDrag(e, canvas, obj, frame, group, 'move'));
        group.querySelector('.lvd-handle').addEventListener('pointerdown', (e) => startDrag(e, canvas, obj, frame, group, 'resize'));
        canvas.appendChild(group);
      });
      panel.appendChild(canvas);
      grid.appendChild(panel);
    }
    container.appendChild(grid);
  }

  function render() {
    state = props.value && typeof props.value === 'object' ? clone(props.value) : null;
    root.innerHTML = '';
    if (!state || !Array.isArray(state.objects)) {
      root.appendChild(el('p', {class: 'lvd-empty'}, 'Plan a layout first: its keyframes appear here.'));
      return;
    }
    const head = el('div', {class: 'lvd-head'});
    head.appendChild(el('span', {class: 'lvd-prompt'}, state.prompt));
    const bgLabel = el('label', {class: 'lvd-bg-label'}, 'Background ');
    const background = el('input', {class: 'lvd-background-input', type: 'text', 'aria-label': 'background keyword'});
    background.value = state.background || '';
    background.addEventListener('change', () => { state.background = background.value; commit(); });
    bgLabel.appendChild(background);
    head.appendChild(bgLabel);
    root.appendChild(head);
    renderObjects(root);
    renderKeyframes(root);
    root.appendChild(el('p', {class: 'lvd-hint'},
      'Drag a box to move it, drag its corner square to resize it; tick the keyframes an object is in. ' +
      'Coordinates snap to the 512-pixel grid of the LLM canvas, stretched to the video\'s aspect ratio.'));
  }

  render();
  watch('value', render);
})();
