/* tally tag: page views (also on single-page-app navigations) and custom events, sent in batches
 * to the tally collector the script was loaded from. Source of tag.min.js: edit this file, then run
 * scripts/build-tag (tests/test_tag.py checks the built file is up to date).
 *
 *   <script defer src="https://COLLECTOR/tag.js" data-site="SITE_KEY"></script>
 *
 * Events name the page's location.hostname as their domain, or data-domain="example.com" (Plausible's
 * attribute) whatever the page's host is: a page on localhost, staging or an IP address then sends for
 * its registered site (the page's origin must still be registered: `tally sites update --add-origin`).
 *   tally('impression', {value: 1.5})
 *
 * Calls made before the script has loaded are queued by the snippet
 *   window.tally = window.tally || function () { (tally.q = tally.q || []).push(arguments) }
 * and sent once it has. No cookies, no localStorage, no dependencies, no console output: every error
 * is swallowed. Pending events live in sessionStorage (this tab only) until the collector confirms them.
 *
 * URLs (docs/adr/0030-url-privacy.md, the collector's core/urls.py applies the same rule): a page URL is
 * sent without its fragment, without user:password@ and with only the query parameters utm_source,
 * utm_medium, utm_campaign, utm_term, utm_content and those named in data-keep-query="a,b"; a referrer
 * of another origin as its origin only. data-raw-urls="true" sends them as they are (the site must be
 * registered with --raw-urls too, or the collector cuts them anyway).
 */
(function () {
  'use strict';
  var noop = function () {};
  // Every callback we hand to the browser goes through this: nothing of ours ever reaches the console.
  var safe = function (fn) {
    return function () {
      try { return fn.apply(this, arguments); } catch (e) { /* never disturb the page */ }
    };
  };
  safe(function () {
    var w = window, d = document, n = navigator, loc = location, h = history;
    var before = w.tally;
    if (before && before.l) return; // the tag is on the page twice: the first one counts
    var script = d.currentScript || d.querySelector('script[data-site]');
    if (!script) return;
    var attr = function (name) { return script.getAttribute('data-' + name); };
    var site = attr('site');
    var domain = script.dataset.domain || loc.hostname;
    var raw = attr('raw-urls') === 'true';
    var keep = ['utm_source', 'utm_medium', 'utm_campaign', 'utm_term', 'utm_content']
      .concat((attr('keep-query') || '').split(',').map(function (k) { return k.trim(); }));
    var wait = parseInt(attr('flush-ms'), 10);
    if (!(wait >= 0)) wait = 1000;
    var queued = (before && before.q) || [];
    if ((attr('respect-dnt') === 'true' && (n.doNotTrack === '1' || n.globalPrivacyControl === true)) ||
        !/^https?:$/.test(loc.protocol)) {
      w.tally = noop; // opted out (or not a web page): send nothing, and let calls do nothing
      noop.l = 1;
      return;
    }
    var api = safe(function (type, opts) {
      if (type === 'impression' || type === 'pageview') add(type, opts || {});
    });
    api.l = 1;
    w.tally = api;

    var endpoint = new URL('/collect', script.src).href + (site ? '?site=' + encodeURIComponent(site) : '');
    var KEY = 'tally:' + (site || '');
    var MAX_QUEUE = 200;   // pending events kept at most; the oldest go first
    var MAX_EVENTS = 50;   // events per request
    var MAX_CHARS = 30000; // JSON per request: keepalive fetch and sendBeacon allow 64 KiB in flight
    var MAX_TRIES = 8;     // sends of one event that failed (network, 429, 5xx) before it is dropped

    // Entries are [event, failed sends]. q: waiting; f: in flight (one request at a time);
    // b: handed to sendBeacon, unconfirmed: kept for the next page load of this tab, which resends them
    // (same ids, so the collector counts them once).
    var q = [], f = [], b = [], timer = 0, fails = 0, last;

    var store = function () {
      try {
        var all = b.concat(f, q);
        if (all.length) sessionStorage.setItem(KEY, JSON.stringify(all));
        else sessionStorage.removeItem(KEY);
      } catch (e) { /* storage full or disabled: events then live only as long as the page */ }
    };
    try {
      q = JSON.parse(sessionStorage.getItem(KEY)) || [];
      q = q.filter(function (x) { return x && x[0] && typeof x[0] === 'object' && x[1] >= 0; });
    } catch (e) { q = []; }

    var uid = function () {
      try { return crypto.randomUUID(); } catch (e) { // randomUUID needs a secure context (https)
        return Array.from(crypto.getRandomValues(new Uint8Array(16)),
          function (x) { return (x + 256).toString(16).slice(1); }).join('');
      }
    };
    var cut = function (url) { return url ? String(url).slice(0, 2048) : ''; };
    // scheme://, user:password@ (dropped), host[:port], path, ?query; never the #fragment
    var parts = function (url) { return /^(https?:\/\/)(?:[^@\/?#]*@)?([^\/?#]*)([^?#]*)(?:\?([^#]*))?/i.exec(url); };
    var clean = function (url) {
      var m = !raw && parts(url);
      if (!m) return url;
      var q = (m[4] || '').split('&').filter(function (p) {
        var name = p.split('=')[0];
        return name && keep.indexOf(name) >= 0;
      }).join('&');
      return m[1] + m[2] + m[3] + (q ? '?' + q : '');
    };
    var origin = function (m) { return m && (m[1] + m[2]).toLowerCase(); };
    // a page of the same origin as url: cut like url; another site's: its origin only
    var referrer = function (ref, url) {
      var m = !raw && ref && parts(ref);
      if (!m) return ref;
      return origin(m) === origin(parts(url)) ? clean(ref) : m[1] + m[2] + '/';
    };

    var schedule = function (ms) {
      if (!timer) timer = setTimeout(safe(function () { timer = 0; send(); }), ms);
    };

    var add = function (type, opts) {
      var url = clean(String(opts.url || loc.href));
      var e = { id: uid(), ts: Date.now(), domain: domain, url: cut(url), type: type };
      var ref = cut(referrer(opts.referrer, url));
      if (ref) e.referrer = ref;
      if (opts.value != null) {
        var v = +opts.value;
        if (!(v >= 0 && v <= 1e9)) return; // the collector would refuse the whole batch
        e.value = Math.round(v * 1e6) / 1e6;
      }
      q.push([e, 0]);
      if (q.length > MAX_QUEUE) q.shift();
      store();
      schedule(wait);
    };

    // The next request's worth of waiting entries, taken off q.
    var take = function () {
      var chars = 0, i = 0;
      while (i < q.length && i < MAX_EVENTS && (chars += JSON.stringify(q[i][0]).length) < MAX_CHARS) i++;
      return q.splice(0, i || 1);
    };
    var body = function (entries) { return JSON.stringify(entries.map(function (x) { return x[0]; })); };

    var send = function () { post().catch(noop); };
    var post = async function () {
      if (f.length || !q.length) return;
      f = take();
      var sent = f, status = 0, res, backoff = 0;
      try {
        res = await fetch(endpoint, {
          method: 'POST', keepalive: true, credentials: 'omit', body: body(sent),
          headers: { 'Content-Type': 'text/plain' } // a CORS "simple request": no preflight
        });
        status = res.status;
      } catch (e) { /* network error: status 0 */ }
      try {
        if (status === 400 && sent.length > 1) {
          // The batch is all or nothing: drop the one event the collector named and resend the rest.
          sent = sent.slice();
          var i = (await res.json()).error.index;
          if (sent[i]) { sent.splice(i, 1); q = sent.concat(q); }
        } else if (!status || status === 429 || status > 499) {
          sent.forEach(function (x) { x[1]++; });
          q = sent.filter(function (x) { return x[1] < MAX_TRIES; }).concat(q);
          backoff = Math.min(6e4, Math.max(1e3 * Math.pow(2, fails++),
            1e3 * (res && +res.headers.get('Retry-After')) || 0));
        } // 2xx: delivered; any other 4xx: the collector refused these events, never resend them
      } catch (e) { /* an unreadable 400: the batch is dropped */ }
      if (!backoff) fails = 0;
      f = [];
      store();
      if (backoff) {
        clearTimeout(timer);
        timer = 0;
        schedule(backoff);
      } else if (q.length) {
        send();
      }
    };

    // The page is going away (or may be killed in the background): hand everything waiting to
    // sendBeacon, which outlives the page. Its answer is unknown, so copies stay in sessionStorage.
    var hide = function () {
      while (q.length) {
        var chunk = take();
        if (n.sendBeacon(endpoint, new Blob([body(chunk)], { type: 'text/plain' }))) b = b.concat(chunk);
        else { q = chunk.concat(q); break; }
      }
      if (b.length > MAX_QUEUE) b = b.slice(-MAX_QUEUE);
      store();
    };
    var on = function (target, type, fn) { target.addEventListener(type, safe(fn)); };
    on(d, 'visibilitychange', function () {
      if (d.visibilityState === 'hidden') hide();
      else if (b.length) { q = b.concat(q); b = []; schedule(wait); } // still alive: confirm by fetch
    });
    on(w, 'pagehide', hide);

    var view = function (from) {
      add('pageview', { referrer: from });
      last = clean(loc.href);
    };
    var navigated = function (always) { // a change of what is sent only: a new #fragment alone is no view
      if (always || clean(loc.href) !== last) view(last);
    };
    ['pushState', 'replaceState'].forEach(function (name) {
      var original = h[name];
      h[name] = function () {
        var result = original.apply(this, arguments); // its errors are the page's own: let them through
        safe(navigated)(name === 'pushState');
        return result;
      };
    });
    on(w, 'popstate', function () { navigated(); });
    on(w, 'hashchange', function () { navigated(); });
    on(w, 'pageshow', function (e) { if (e.persisted) view(d.referrer); }); // back from the bfcache

    var start = function () {
      view(d.referrer);
      queued.forEach(function (args) { api.apply(null, args); });
      if (q.length) schedule(wait);
    };
    if (d.prerendering) on(d, 'prerenderingchange', start); // count it when the user actually sees it
    else start();
  })();
})();
