{{/*
Helpers of the kvtier chart: names and labels, the size parser, the tier config
(rendered once, into the ConfigMap), and the Ray cluster spec shared by the
RayService and the RayCluster.
*/}}

{{- define "kvtier.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{/* 40 characters at most: KubeRay derives pod, service and (for a RayService) cluster names from it. */}}
{{- define "kvtier.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "kvtier.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kvtier.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "kvtier.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "kvtier.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "kvtier.configMapName" -}}{{ include "kvtier.fullname" . }}-config{{- end -}}
{{- define "kvtier.configDir" -}}/etc/kvtier{{- end -}}
{{- define "kvtier.configPath" -}}{{ include "kvtier.configDir" . }}/config.json{{- end -}}

{{- define "kvtier.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kvtier.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
A size in bytes: an int, or a string like "16GiB", "512MB", "1.5Gi" with the units
kvtier.config.parse_size accepts (k/m/g/t = 1000^n, ki/mi/gi/ti = 1024^n, optional
"b", any case). Call with (dict "name" "tier.warmBytes" "value" $v); prints an int.
*/}}
{{- define "kvtier.bytes" -}}
{{- $v := .value -}}
{{- if kindIs "string" $v -}}
{{- $s := trim $v -}}
{{- $num := regexFind "^[0-9]+(\\.[0-9]+)?" $s -}}
{{- $unit := lower (trim (trimPrefix $num $s)) -}}
{{- $units := dict "" 1 "b" 1 "k" 1000 "kb" 1000 "m" 1000000 "mb" 1000000 "g" 1000000000 "gb" 1000000000 "t" 1000000000000 "tb" 1000000000000 "ki" 1024 "kib" 1024 "mi" 1048576 "mib" 1048576 "gi" 1073741824 "gib" 1073741824 "ti" 1099511627776 "tib" 1099511627776 -}}
{{- if or (not $num) (not (hasKey $units $unit)) -}}
{{- fail (printf "%s=%q is not a size: use an int of bytes or a string like \"16GiB\", \"512MB\"" .name $v) -}}
{{- end -}}
{{- if contains "." $num -}}
{{- mulf (float64 $num) (index $units $unit) | int64 -}}
{{- else -}}
{{- mul (int64 $num) (index $units $unit) -}}
{{- end -}}
{{- else -}}
{{- $v | int64 -}}
{{- end -}}
{{- end -}}

{{/* MiB, rounded up: memory quantities read better than 11811160064. */}}
{{- define "kvtier.mib" -}}
{{- div (add (int64 .) 1048575) 1048576 -}}Mi
{{- end -}}

{{/* Warm shards: one per kvtier_shard resource unit of the cache-shard pods. */}}
{{- define "kvtier.numShards" -}}
{{- mul (int64 .Values.cacheShards.replicas) (int64 .Values.cacheShards.shardsPerPod) -}}
{{- end -}}

{{/* TierConfig.shard_bytes = warm_bytes // num_shards */}}
{{- define "kvtier.shardBytes" -}}
{{- $warm := include "kvtier.bytes" (dict "name" "tier.warmBytes" "value" .Values.tier.warmBytes) | int64 -}}
{{- div $warm (include "kvtier.numShards" . | int64) -}}
{{- end -}}

{{/* Object store of a cache-shard pod: its shards' budgets plus headroom (bytes). */}}
{{- define "kvtier.shardObjectStoreBytes" -}}
{{- $c := .Values.cacheShards -}}
{{- $headroom := include "kvtier.bytes" (dict "name" "cacheShards.objectStoreHeadroom" "value" $c.objectStoreHeadroom) | int64 -}}
{{- add (mul (include "kvtier.shardBytes" . | int64) (int64 $c.shardsPerPod)) $headroom -}}
{{- end -}}

{{/* Memory request (= limit) of a cache-shard pod: object store plus overhead (bytes). */}}
{{- define "kvtier.shardMemoryBytes" -}}
{{- $overhead := include "kvtier.bytes" (dict "name" "cacheShards.memoryOverhead" "value" .Values.cacheShards.memoryOverhead) | int64 -}}
{{- add (include "kvtier.shardObjectStoreBytes" . | int64) $overhead -}}
{{- end -}}

{{/* "local", "s3" or "none": what cold.uri names. */}}
{{- define "kvtier.coldKind" -}}
{{- $u := .Values.cold.uri -}}
{{- if not $u -}}none
{{- else if hasPrefix "s3://" $u -}}s3
{{- else if or (hasPrefix "/" $u) (hasPrefix "file:///" $u) -}}local
{{- else -}}
{{- fail (printf "cold.uri=%q: expected a local path (/...), file:///path, s3://bucket/prefix or \"\"" $u) -}}
{{- end -}}
{{- end -}}

{{- define "kvtier.coldPath" -}}{{ trimPrefix "file://" .Values.cold.uri }}{{- end -}}

{{- define "kvtier.coldClaimName" -}}
{{- default (printf "%s-cold" (include "kvtier.fullname" .)) .Values.cold.pvc.existingClaim -}}
{{- end -}}

{{/* The tier config (kvtier.TierConfig fields, sizes in bytes): the one source every pod reads. */}}
{{- define "kvtier.config" -}}
{{- $t := .Values.tier -}}
{{- $s3 := eq (include "kvtier.coldKind" .) "s3" -}}
{{- $cfg := dict
    "hot_bytes" (include "kvtier.bytes" (dict "name" "tier.hotBytes" "value" $t.hotBytes) | int64)
    "warm_bytes" (include "kvtier.bytes" (dict "name" "tier.warmBytes" "value" $t.warmBytes) | int64)
    "num_shards" (include "kvtier.numShards" . | int64)
    "cold_uri" .Values.cold.uri
    "cold_bytes" (include "kvtier.bytes" (dict "name" "cold.bytes" "value" .Values.cold.bytes) | int64)
    "codec" $t.codec
    "chunk_tokens" ($t.chunkTokens | int64)
    "write_through" $t.writeThrough
    "tenant" $t.tenant
    "s3_endpoint" (ternary .Values.cold.s3.endpoint "" $s3)
    "s3_region" .Values.cold.s3.region
    "rpc_timeout_s" $t.rpcTimeoutS
-}}
{{- toPrettyJson $cfg -}}
{{- end -}}

{{- define "kvtier.image" -}}
{{- $img := merge (deepCopy (default (dict) .group.image)) .root.Values.image -}}
image: {{ printf "%s:%s" $img.repository (default .root.Chart.AppVersion $img.tag) | quote }}
imagePullPolicy: {{ $img.pullPolicy }}
{{- end -}}

{{/* Env of every Ray container: the config path, and Secret references (never values). */}}
{{- define "kvtier.env" -}}
- name: KVTIER_CONFIG
  value: {{ include "kvtier.configPath" . | quote }}
{{- $sec := .Values.cold.s3.credentialsSecret -}}
{{- if and (eq (include "kvtier.coldKind" .) "s3") $sec.name }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ $sec.name | quote }}
      key: {{ $sec.accessKeyIdKey | quote }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $sec.name | quote }}
      key: {{ $sec.secretAccessKeyKey | quote }}
{{- end }}
{{- if .Values.serve.apiTokenSecret.name }}
- name: KVTIER_API_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.serve.apiTokenSecret.name | quote }}
      key: {{ .Values.serve.apiTokenSecret.key | quote }}
{{- end }}
{{- if .Values.serve.apiTokensSecret.name }}
- name: KVTIER_API_TOKENS
  valueFrom:
    secretKeyRef:
      name: {{ .Values.serve.apiTokensSecret.name | quote }}
      key: {{ .Values.serve.apiTokensSecret.key | quote }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "kvtier.volumeMounts" -}}
- name: kvtier-config
  mountPath: {{ include "kvtier.configDir" . }}
  readOnly: true
- name: dshm
  mountPath: /dev/shm
{{- if eq (include "kvtier.coldKind" .) "local" }}
- name: kvtier-cold
  mountPath: {{ include "kvtier.coldPath" . }}
{{- end }}
{{- if .Values.modelVolume.existingClaim }}
- name: models
  mountPath: {{ .Values.modelVolume.mountPath }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* Call with (dict "root" $ "shmBytes" N); shmBytes 0: /dev/shm bounded by the pod's memory limit. */}}
{{- define "kvtier.volumes" -}}
{{- $root := .root -}}
- name: kvtier-config
  configMap:
    name: {{ include "kvtier.configMapName" $root }}
# Ray's object store lives in /dev/shm; a container's default is 64 MiB.
- name: dshm
  emptyDir:
    medium: Memory
    {{- if .shmBytes }}
    sizeLimit: {{ include "kvtier.mib" .shmBytes }}
    {{- end }}
{{- if eq (include "kvtier.coldKind" $root) "local" }}
- name: kvtier-cold
  persistentVolumeClaim:
    claimName: {{ include "kvtier.coldClaimName" $root }}
{{- end }}
{{- if $root.Values.modelVolume.existingClaim }}
- name: models
  persistentVolumeClaim:
    claimName: {{ $root.Values.modelVolume.existingClaim }}
    readOnly: true
{{- end }}
{{- end -}}

{{/* Checks across values that values.schema.json cannot express; prints nothing. */}}
{{- define "kvtier.validate" -}}
{{- $kind := include "kvtier.coldKind" . -}}
{{- $shard := include "kvtier.shardBytes" . | int64 -}}
{{- if lt $shard 1048576 -}}
{{- fail (printf "tier.warmBytes=%v over %d shards (cacheShards.replicas x shardsPerPod) gives %d bytes per shard; each shard needs at least 1 MiB" .Values.tier.warmBytes (include "kvtier.numShards" . | int64) $shard) -}}
{{- end -}}
{{- if .Values.serve.enabled -}}
{{- $v := .Values -}}
{{- $tp := int64 $v.serve.engine.tensorParallelSize -}}
{{- if eq $v.serve.shape "pd" -}}
{{- range $g := list "prefill" "decode" -}}
{{- if lt (int64 (index $v $g).replicas) 1 -}}
{{- fail (printf "%s.replicas=%v: the Serve app in shape pd (serve.enabled=true) needs at least one %s pod" $g (index $v $g).replicas $g) -}}
{{- end -}}
{{- end -}}
{{- else if lt (add (int64 $v.prefill.replicas) (int64 $v.decode.replicas)) 1 -}}
{{- fail "prefill.replicas + decode.replicas = 0: the Serve app in shape shared needs at least one engine pod" -}}
{{- end -}}
{{- if ne (gt (int64 $v.prefill.gpus) 0) (gt (int64 $v.decode.gpus) 0) -}}
{{- fail (printf "prefill.gpus=%v, decode.gpus=%v: the engines run either all on GPUs or all on CPUs" $v.prefill.gpus $v.decode.gpus) -}}
{{- end -}}
{{- range $g := list "prefill" "decode" -}}
{{- $n := int64 (index $v $g).gpus -}}
{{- if and (gt $n 0) (ne (mod $n $tp) 0) -}}
{{- fail (printf "%s.gpus=%d is not a multiple of serve.engine.tensorParallelSize=%d" $g $n $tp) -}}
{{- end -}}
{{- end -}}
{{- if and (gt $tp 1) (eq (int64 $v.decode.gpus) 0) -}}
{{- fail (printf "serve.engine.tensorParallelSize=%d needs GPUs (prefill.gpus/decode.gpus are 0)" $tp) -}}
{{- end -}}
{{- end -}}
{{- if and (eq $kind "local") (or (hasPrefix "/etc/kvtier" (include "kvtier.coldPath" .)) (hasPrefix "/dev/shm" (include "kvtier.coldPath" .))) -}}
{{- fail (printf "cold.uri=%q lies under a path the chart mounts (/etc/kvtier, /dev/shm); choose another directory" .Values.cold.uri) -}}
{{- end -}}
{{- end -}}
