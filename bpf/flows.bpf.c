/* flows.bpf.c — Tollgate's flow ledger and bypass guard, at TC (clsact) on each
 * agent-facing interface of the appliance.
 *
 * ingress (from the agents): every IPv4/IPv6 packet from an agent address, or towards a
 * protected address, is accounted to its flow; a packet towards a protected address that
 * nftables will not divert into the proxy is dropped here, with a reason, before
 * conntrack or nftables see it. "Will be diverted" is what the divert rule matches: TCP
 * from the agent set to a target's address and port. Of that, only segments of a
 * connection whose SYN was seen here pass.
 * egress (to the agents): the answers are counted to the flow they belong to; nothing is
 * ever dropped on egress.
 *
 * A flow closes on a RST or once both sides sent a FIN; it then goes to user space through
 * the ring buffer and stays in the map (closed) until the loader's sweep removes it, so
 * the last ACKs still pass. The map is bounded (MAX_FLOWS): a flow it has no room for is
 * counted (TG_CTR_OVERFLOW), and a new diverted connection is refused (fail closed: no
 * connection the ledger can't show).
 *
 * Compiled by bcc with -I bpf/ -DMAX_FLOWS=… -DRINGBUF_PAGES=…; models: libbpf-tools,
 * bcc's tcplife, Cilium Hubble's flow records.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include <uapi/linux/icmp.h>
#include <uapi/linux/pkt_cls.h>

#include "tollgate_bpf.h"

#ifndef MAX_FLOWS
#define MAX_FLOWS 65536
#endif
#ifndef RINGBUF_PAGES
#define RINGBUF_PAGES 64
#endif

BPF_HASH(flows, struct tg_flow_key, struct tg_flow_val, MAX_FLOWS);
BPF_LPM_TRIE(agents, struct tg_lpm_key, __u8, 1024);
BPF_LPM_TRIE(protected, struct tg_lpm_key, __u8, 1024);
BPF_HASH(targets, struct tg_endpoint, __u8, 1024);
BPF_HASH(allowed, struct tg_endpoint, __u8, 4096);
BPF_ARRAY(settings, struct tg_settings, 1);
BPF_PERCPU_ARRAY(counters, __u64, TG_COUNTERS);
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);

#define IP_MF 0x2000
#define IP_OFFSET 0x1fff
#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_ACK 0x10

struct parsed {
	struct tg_flow_key key;
	__u8 tcp_flags;
	__u8 bad;      /* a TG_REASON_* that makes this packet a bypass whatever its destination */
	__u8 l4;       /* 1 when the ports/flags were read */
};

static __always_inline void count(__u32 index)
{
	__u64 *value = counters.lookup(&index);
	if (value)
		*value += 1;
}

/* Read the IP and transport headers into p; 0 if the packet is not IP (left alone). */
static __always_inline int parse(struct __sk_buff *skb, struct parsed *p)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	void *l4;
	__u8 proto;

	if ((void *)(eth + 1) > end)
		return 0;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		if ((void *)(ip + 1) > end) {
			p->key.family = 4;
			p->bad = TG_REASON_MALFORMED;
			return 1;
		}
		p->key.family = 4;
		__builtin_memcpy(p->key.saddr, &ip->saddr, 4);
		__builtin_memcpy(p->key.daddr, &ip->daddr, 4);
		proto = ip->protocol;
		p->key.proto = proto;
		if (ip->ihl < 5) {
			p->bad = TG_REASON_MALFORMED;
			return 1;
		}
		if (ip->frag_off & bpf_htons(IP_MF | IP_OFFSET)) {
			p->bad = TG_REASON_FRAGMENT;
			return 1;  /* a later fragment has no ports: the flow is the address pair */
		}
		if (ip->ihl > 5)
			p->bad = TG_REASON_IP_OPTIONS;
		l4 = (void *)ip + ip->ihl * 4;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		p->key.family = 6;
		if ((void *)(ip6 + 1) > end) {
			p->bad = TG_REASON_MALFORMED;
			return 1;
		}
		__builtin_memcpy(p->key.saddr, &ip6->saddr, 16);
		__builtin_memcpy(p->key.daddr, &ip6->daddr, 16);
		proto = ip6->nexthdr;
		p->key.proto = proto;
		if (proto == 44) {  /* NEXTHDR_FRAGMENT */
			p->bad = TG_REASON_FRAGMENT;
			return 1;
		}
		if (proto != IPPROTO_TCP && proto != IPPROTO_UDP && proto != 58 /* ICMPv6 */) {
			/* hop-by-hop, routing, destination options, AH, ESP, mobility, HIP, shim6,
			 * experimental, or no next header: the transport is not where TCP would be. */
			if (proto == 0 || proto == 43 || proto == 60 || proto == 51 || proto == 50 || proto == 135
			    || proto == 139 || proto == 140 || proto == 253 || proto == 254 || proto == 59)
				p->bad = TG_REASON_IPV6_EXT;
			return 1;
		}
		l4 = (void *)(ip6 + 1);
	} else {
		return 0;
	}
	if (proto == IPPROTO_TCP) {
		struct tcphdr *tcp = l4;
		if ((void *)(tcp + 1) > end) {
			p->bad = TG_REASON_MALFORMED;
			return 1;
		}
		p->key.sport = bpf_ntohs(tcp->source);
		p->key.dport = bpf_ntohs(tcp->dest);
		p->tcp_flags = ((__u8 *)tcp)[13];
		p->l4 = 1;
	} else if (proto == IPPROTO_UDP) {
		struct udphdr *udp = l4;
		if ((void *)(udp + 1) > end) {
			p->bad = TG_REASON_MALFORMED;
			return 1;
		}
		p->key.sport = bpf_ntohs(udp->source);
		p->key.dport = bpf_ntohs(udp->dest);
		p->l4 = 1;
	} else if (proto == IPPROTO_ICMP || proto == 58) {
		struct icmphdr *icmp = l4;
		if ((void *)(icmp + 1) > end) {
			p->bad = TG_REASON_MALFORMED;
			return 1;
		}
		p->key.dport = (__u16)icmp->type << 8 | icmp->code;
		p->key.sport = bpf_ntohs(icmp->un.echo.id);
		p->l4 = 1;
	}
	return 1;
}

static __always_inline void lpm_key(struct tg_lpm_key *lk, struct tg_flow_key *key, int source)
{
	lk->prefixlen = 8 + (key->family == 4 ? 32 : 128);
	lk->family = key->family;
	__builtin_memcpy(lk->addr, source ? key->saddr : key->daddr, 16);
}

static __always_inline void emit_close(struct tg_flow_key *key, struct tg_flow_val *val)
{
	struct tg_flow_event *ev = events.ringbuf_reserve(sizeof(struct tg_flow_event));
	if (!ev) {
		count(TG_CTR_EVENTS_LOST);
		return;
	}
	__builtin_memcpy(&ev->key, key, sizeof(*key));
	__builtin_memcpy(&ev->val, val, sizeof(*val));
	events.ringbuf_submit(ev, 0);
}

/* Account one packet to its flow (dir 0: from the agent, 1: to it); create the flow on
 * the agent side when create is set. Returns the flow, or NULL. */
static __always_inline struct tg_flow_val *account(struct tg_flow_key *key, struct __sk_buff *skb, int dir,
						   __u8 flags, __u8 verdict, __u8 reason, int create, int *full)
{
	__u64 now = bpf_ktime_get_ns();
	struct tg_flow_val *val = flows.lookup(key);

	if (!val) {
		struct tg_flow_val fresh = {};
		if (!create)
			return NULL;
		fresh.first_ns = now;
		fresh.last_ns = now;
		fresh.ifindex = skb->ifindex;
		fresh.verdict = verdict;
		fresh.reason = reason;
		if (flows.insert(key, &fresh) != 0) {
			val = flows.lookup(key);  /* another CPU made it meanwhile */
			if (!val) {
				count(TG_CTR_OVERFLOW);
				*full = 1;
				return NULL;
			}
		} else {
			val = flows.lookup(key);
			if (!val)
				return NULL;
		}
	}
	val->last_ns = now;
	__sync_fetch_and_add(&val->packets[dir & 1], 1);
	__sync_fetch_and_add(&val->bytes[dir & 1], skb->len);
	val->flags[dir & 1] |= flags;
	if (val->state & TG_STATE_CLOSED)
		return val;
	if (flags & TCP_RST) {
		val->state |= TG_STATE_CLOSED | TG_STATE_RST;
		emit_close(key, val);
	} else if (flags & TCP_FIN) {
		val->state |= dir ? TG_STATE_FIN_OUT : TG_STATE_FIN_IN;
		if ((val->state & (TG_STATE_FIN_IN | TG_STATE_FIN_OUT)) == (TG_STATE_FIN_IN | TG_STATE_FIN_OUT)) {
			val->state |= TG_STATE_CLOSED;
			emit_close(key, val);
		}
	}
	return val;
}

static __always_inline int guard_on(void)
{
	__u32 zero = 0;
	struct tg_settings *s = settings.lookup(&zero);
	return s && s->guard;
}

/* A bypass towards a protected destination: dropped (recorded as such) unless the guard is
 * off or the destination only records. */
static __always_inline int bypass(struct parsed *p, struct __sk_buff *skb, __u8 reason, __u8 action)
{
	int full = 0;
	if (action == TG_ACTION_DROP && guard_on()) {
		count(reason);
		account(&p->key, skb, 0, p->tcp_flags, TG_VERDICT_DROPPED, reason, 1, &full);
		return TC_ACT_SHOT;
	}
	count(TG_CTR_RECORDED);
	account(&p->key, skb, 0, p->tcp_flags, TG_VERDICT_PASSED, reason, 1, &full);
	return TC_ACT_OK;
}

int tg_ingress(struct __sk_buff *skb)
{
	struct parsed p = {};
	struct tg_endpoint ep = {};
	struct tg_flow_val *val;
	struct tg_lpm_key lk = {};
	__u8 action = 0, *target, *found;
	int agent, protect, full = 0;

	if (!parse(skb, &p))
		return TC_ACT_OK;
	/* bcc rewrites map.lookup() only where the map is named, hence no helper taking a map */
	lpm_key(&lk, &p.key, 1);
	agent = agents.lookup(&lk) != NULL;
	lpm_key(&lk, &p.key, 0);
	found = protected.lookup(&lk);
	protect = found != NULL;
	if (found)
		action = *found;
	if (!protect) {
		if (!agent) {
			count(TG_CTR_UNTRACKED);
			return TC_ACT_OK;  /* neither from an agent nor towards a database: not ours */
		}
		count(TG_CTR_PASSED);
		account(&p.key, skb, 0, p.tcp_flags, TG_VERDICT_PASSED, p.bad, 1, &full);
		return TC_ACT_OK;
	}
	/* Towards a protected address: only what the divert takes may pass. */
	if (!agent)
		return bypass(&p, skb, TG_REASON_SOURCE, action);
	if (p.bad)
		return bypass(&p, skb, p.bad, action);
	if (p.key.proto == IPPROTO_UDP)
		return bypass(&p, skb, TG_REASON_UDP, action);
	if (p.key.proto == IPPROTO_ICMP || p.key.proto == 58)
		return bypass(&p, skb, TG_REASON_ICMP, action);
	if (p.key.proto != IPPROTO_TCP || !p.l4)
		return bypass(&p, skb, TG_REASON_OTHER_PROTO, action);

	__builtin_memcpy(ep.addr, p.key.daddr, 16);
	ep.port = p.key.dport;
	ep.family = p.key.family;
	target = targets.lookup(&ep);
	if (!target) {
		if (allowed.lookup(&ep)) {
			count(TG_CTR_PASSED);
			account(&p.key, skb, 0, p.tcp_flags, TG_VERDICT_PASSED, TG_REASON_ALLOWED_PORT, 1, &full);
			return TC_ACT_OK;
		}
		return bypass(&p, skb, TG_REASON_OTHER_PORT, action);
	}
	action = *target;
	if ((p.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN)) == TCP_SYN) {
		/* A new diverted connection (or its SYN again): a flow of its own, from scratch
		 * when the 5-tuple's last flow is over or was never one the proxy took. */
		val = flows.lookup(&p.key);
		if (val && (val->verdict != TG_VERDICT_INTERCEPTED || (val->state & TG_STATE_CLOSED)))
			flows.delete(&p.key);
		val = account(&p.key, skb, 0, p.tcp_flags, TG_VERDICT_INTERCEPTED, TG_REASON_NONE, 1, &full);
		if (!val) {
			if (full && action == TG_ACTION_DROP && guard_on()) {
				count(TG_REASON_LEDGER_FULL);
				return TC_ACT_SHOT;  /* a connection the ledger could not show */
			}
			count(TG_CTR_RECORDED);
			return TC_ACT_OK;
		}
		count(TG_CTR_INTERCEPTED);
		return TC_ACT_OK;
	}
	val = flows.lookup(&p.key);
	if (val && val->verdict == TG_VERDICT_INTERCEPTED) {
		account(&p.key, skb, 0, p.tcp_flags, 0, 0, 0, &full);
		count(TG_CTR_INTERCEPTED);
		return TC_ACT_OK;
	}
	return bypass(&p, skb, TG_REASON_NOT_DIVERTED, action);
}

int tg_egress(struct __sk_buff *skb)
{
	struct parsed p = {};
	struct tg_flow_key rev = {};
	int full = 0;

	if (!parse(skb, &p) || p.bad == TG_REASON_MALFORMED)
		return TC_ACT_OK;
	/* The answer's flow is the agent's, reversed. */
	__builtin_memcpy(rev.saddr, p.key.daddr, 16);
	__builtin_memcpy(rev.daddr, p.key.saddr, 16);
	rev.family = p.key.family;
	rev.proto = p.key.proto;
	if (p.key.proto == IPPROTO_ICMP || p.key.proto == 58) {
		/* an echo reply answers the request's flow: type 0/129 for 8/128 */
		__u16 type = p.key.dport >> 8;
		if (type == 0 || type == 129)
			rev.dport = (type == 0 ? 8 : 128) << 8;
		else
			rev.dport = p.key.dport;
		rev.sport = p.key.sport;
	} else {
		rev.sport = p.key.dport;
		rev.dport = p.key.sport;
	}
	account(&rev, skb, 1, p.tcp_flags, 0, 0, 0, &full);
	return TC_ACT_OK;  /* egress only counts */
}
