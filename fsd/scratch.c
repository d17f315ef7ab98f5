#include "fsd/scratch.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

gl_scratch *gl_scratch_find(gl_scratches *r, uint64_t iuid, bool devices, const char *name,
                            size_t len)
{
	gl_scratch *s;

	for (s = r->head; s; s = s->next)
		if (s->iuid == iuid && s->devices == devices && s->name_len == len &&
		    memcmp(s->name, name, len) == 0)
			return s;
	return NULL;
}

size_t gl_scratch_count(gl_scratches *r, uint64_t iuid, bool devices)
{
	gl_scratch *s;
	size_t n = 0;

	for (s = r->head; s; s = s->next)
		if (s->iuid == iuid && s->devices == devices)
			n++;
	return n;
}

int gl_scratch_new(gl_scratches *r, uint64_t iuid, const char *iname, bool devices,
                   const char *name, size_t len, mode_t mode, int64_t mtime_ns,
                   uint64_t now_ms, gl_scratch **out)
{
	gl_scratch *s = calloc(1, sizeof(*s));

	if (!s)
		return -ENOMEM;
	s->iname = strdup(iname);
	if (!s->iname || gl_scratch_set_name(s, name, len) < 0) {
		free(s->iname);
		free(s);
		return -ENOMEM;
	}
	s->refs = 1;
	s->live = true;
	s->iuid = iuid;
	s->devices = devices;
	s->mode = mode & 07777;
	s->mtime_ns = mtime_ns;
	s->last_close_ms = now_ms;
	s->next = r->head;
	if (r->head)
		r->head->prev = s;
	r->head = s;
	r->count++;
	*out = s;
	return 0;
}

int gl_scratch_set_name(gl_scratch *s, const char *name, size_t len)
{
	char *copy = malloc(len + 1);

	if (!copy)
		return -ENOMEM;
	memcpy(copy, name, len);
	copy[len] = '\0';
	free(s->name);
	s->name = copy;
	s->name_len = len;
	return 0;
}

void gl_scratch_remove(gl_scratches *r, gl_scratch *s)
{
	if (!s->live)
		return;
	if (s->prev)
		s->prev->next = s->next;
	else
		r->head = s->next;
	if (s->next)
		s->next->prev = s->prev;
	s->next = s->prev = NULL;
	s->live = false;
	r->count--;
	gl_scratch_unref(s);
}

gl_scratch *gl_scratch_ref(gl_scratch *s)
{
	s->refs++;
	return s;
}

void gl_scratch_unref(gl_scratch *s)
{
	if (!s || --s->refs > 0)
		return;
	gl_buf_free(&s->data);
	free(s->iname);
	free(s->name);
	free(s);
}
